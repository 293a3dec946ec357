"""Generate engine/pb/ from proto/ with grpcio-tools: a build step, never run on import.

setup.py runs it before building the wheel, the sdist or an editable install (so grpcio-tools is a
build requirement, not a runtime one); by hand:

    python scripts/gen_proto.py          # regenerate (needs grpcio-tools: the dev extra has it)
    python scripts/gen_proto.py --check  # exit 1 when the generated code is missing or stale

``protoc -I proto`` names the module after the proto's path (``engine/v1/engine.proto`` ->
``engine.v1``), which would collide with our package; the generated files are therefore written
under ``engine/pb/`` and their imports rewritten to ``engine.pb.engine.v1``. A stamp file holds
the hash of the protos they were generated from, so that stale code is regenerated (or, with
``--check``, reported) instead of silently used. This file imports nothing of the package: setup.py
loads it by path in an isolated build environment.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
    return STAMP.is_file() and STAMP.read_text().strip() == proto_digest()


def generate() -> list[Path]:
    """Regenerate every module; returns the files written."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    files = proto_files()
    if not files:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
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
        raise SystemExit(f"protoc failed on {', '.join(str(p) for p in files)}")
    written = []
    for path in sorted(OUT_DIR.rglob("*_pb2*.py*")):
        text = path.read_text()
        path.write_text(_IMPORT.sub("from engine.pb.engine.v1 import", text))
        written.append(path)
    # Packages for the generated tree (committed for engine/v1, so that setup.py finds them).
    for folder in {p.parent for p in written}:
        current = folder
        while current != OUT_DIR:
            init = current / "__init__.py"
            if not init.exists():
                init.write_text("")
            current = current.parent
    STAMP.write_text(proto_digest() + "\n")
    return written


def ensure_current() -> None:
    """Generate when missing or stale (what setup.py calls)."""
    if not is_current():
        for path in generate():
            print(f"gen_proto: wrote {path.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that engine/pb is current")
    args = parser.parse_args()
    if args.check:
        if is_current():
            print("engine/pb is current")
            return 0
        print("engine/pb is missing or stale: run `python scripts/gen_proto.py`", file=sys.stderr)
        return 1
    for path in generate():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
