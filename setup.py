"""The one compiled part, engine.runtime._qlinear: small-batch int8/float32 linear layers
(engine/runtime/_qlinear.c) and the rest of a T5 layer (_t5ops.c: attention, norm, activation) for
our decoder (see those files for why). It is optional: without a C compiler, or on a CPU
without AVX-512, the runtime keeps its numpy path (engine/runtime/qlinear.py says which is used)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engine.runtime._qlinear",
            sources=["engine/runtime/_qlinear.c", "engine/runtime/_t5ops.c"],
            depends=["engine/runtime/_t5ops.h"],
            extra_compile_args=["-O3", "-fopenmp", "-Wall", "-Wextra"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
