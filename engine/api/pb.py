"""The generated protobuf modules (engine/pb/, git-ignored). They are generated at build time
(setup.py, for the wheel, the sdist and editable installs), never on import."""

from __future__ import annotations

try:
    from engine.pb.engine.v1 import engine_pb2, engine_pb2_grpc
except ModuleNotFoundError as exc:  # a source tree that was never built
    raise ModuleNotFoundError(
        "the generated gRPC code (engine/pb/engine/v1) is missing: install the package "
        "(`pip install .`, which generates it) or, in a checkout with grpcio-tools, run "
        "`python scripts/gen_proto.py`"
    ) from exc

__all__ = ["engine_pb2", "engine_pb2_grpc"]
