"""Build steps that pyproject.toml cannot declare:

- The gRPC code: scripts/gen_proto.py generates engine/pb/ from proto/ before the wheel, the sdist
  or an editable install is built (grpcio-tools is a build requirement, not a runtime one). The
  packages' ``__init__.py`` files are committed, so that package discovery finds them in a clean
  checkout; their modules are generated. Nothing is generated on import.
- The one compiled part, engine.runtime._qlinear: small-batch int8/float32 linear layers
  (engine/runtime/_qlinear.c) and the rest of a T5 layer (_t5ops.c: attention, norm, activation)
  for our decoder (see those files for why). It is optional: without a C compiler (or when it
  fails to build, or on a CPU without AVX-512) the build goes on without it and the runtime keeps
  its numpy path (engine/runtime/qlinear.py says which is used; ENGINE_QLINEAR=0 forces numpy).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProto(build_py):
    """build_py (also run by editable installs) after generating engine/pb/."""

    def run(self) -> None:
        gen_proto().ensure_current()
        super().run()


class SdistWithProto(sdist):
    """The sdist carries the generated code too (and proto/ and the generator, to rebuild it)."""

    def run(self) -> None:
        gen_proto().ensure_current()
        super().run()


setup(
    cmdclass={"build_py": BuildPyWithProto, "sdist": SdistWithProto},
    ext_modules=[
        Extension(
            "engine.runtime._qlinear",
            sources=[
                "engine/runtime/_qlinear.c",
                "engine/runtime/_t5ops.c",
                "engine/runtime/_pool.c",
                "engine/runtime/_choose.c",
            ],
            depends=[
                "engine/runtime/_t5ops.h",
                "engine/runtime/_qlinear.h",
                "engine/runtime/_pool.h",
                "engine/runtime/_choose.h",
                "engine/runtime/_simd.h",
            ],
            extra_compile_args=["-O3", "-fopenmp", "-Wall", "-Wextra"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ],
)
