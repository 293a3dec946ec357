"""Generates ``engine/pb/`` from ``proto/`` with grpcio-tools.

``protoc -I proto`` names the module after the proto's path (``engine/v1/engine.proto`` ->
``engine.v1``), which would collide with this package; the generated files are therefore written
under ``engine/pb/`` and their imports rewritten to ``engine.pb.engine.v1``. A stamp file holds
the hash of the protos they were generated from, so that stale code is regenerated (or, with
``check``, reported) instead of silently used.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

from engine.errors import EngineError

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "engine" / "pb"
STAMP = OUT_DIR / ".proto-sha256"
_IMPORT = re.compile(r"^from engine\.v1 import", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def proto_digest() -> str:
    h = hashlib.sha256()
    for path in proto_files():
        h.update(path.relative_to(PROTO_DIR).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def is_current() -> bool:
    """True when the generated code matches the protos (or no protos ship, as in an installed wheel)."""
    if not PROTO_DIR.is_dir():
        return True
    return STAMP.is_file() and STAMP.read_text().strip() == proto_digest()


def generate() -> list[Path]:
    """Regenerate every module; returns the files written."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    files = proto_files()
    if not files:
        raise EngineError(f"no .proto files under {PROTO_DIR}")
    include = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *(str(p) for p in files),
    ]
    if protoc.main(args) != 0:
        raise EngineError(f"protoc failed on {', '.join(str(p) for p in files)}")
    written = []
    for path in sorted(OUT_DIR.rglob("*_pb2*.py*")):
        text = path.read_text()
        path.write_text(_IMPORT.sub("from engine.pb.engine.v1 import", text))
        written.append(path)
    # Packages for the generated tree (engine/pb/__init__.py itself is committed).
    for folder in {p.parent for p in written}:
        current = folder
        while current != OUT_DIR:
            init = current / "__init__.py"
            if not init.exists():
                init.write_text("")
            current = current.parent
    STAMP.write_text(proto_digest() + "\n")
    return written


def ensure_generated() -> None:
    """Generate when missing or stale: a fresh clone works even before ``make proto``."""
    if not is_current():
        generate()
