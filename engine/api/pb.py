"""The generated protobuf modules (engine/pb/, git-ignored), generated on first use when missing or
stale so that a fresh clone works before ``make proto``."""

from __future__ import annotations

from engine.api.protogen import ensure_generated

ensure_generated()

from engine.pb.engine.v1 import engine_pb2, engine_pb2_grpc  # noqa: E402

__all__ = ["engine_pb2", "engine_pb2_grpc"]
