"""Builds the optional C extension souplm._kernels (the fused merge executor, src/souplm/engine/execute_fused.py).

All package metadata lives in pyproject.toml. The extension is optional: where it cannot be compiled,
the package installs without it and every merge runs on the torch executor.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "souplm._kernels",
            ["src/souplm/_kernels.c"],
            # Plain float32 arithmetic in the stated order: no fused multiply-adds, no -march=native
            # (a wheel must run on any x86-64; hot loops get an AVX2 clone chosen at run time).
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"],
            optional=True,
        )
    ]
)
