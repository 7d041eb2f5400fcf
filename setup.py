"""Build the native kernels (specdec/kernels/*.cpp) as one plain shared library.

It has a C ABI and is loaded with ctypes, so it needs neither torch nor Python
headers at build time (torch inside pip's isolated build would pull a CUDA
build). No -march flags: the AVX-512 VNNI path is chosen at run time.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "specdec.kernels._qgemm",
            sources=[
                "src/specdec/kernels/qgemm.cpp",
                "src/specdec/kernels/attention.cpp",
                "src/specdec/kernels/layer.cpp",
            ],
            depends=["src/specdec/kernels/native.h", "src/specdec/kernels/simd.h"],
            extra_compile_args=[
                "-O3",
                "-std=c++17",
                "-fopenmp",
                "-fno-math-errno",
                "-ffp-contract=off",
            ],
            extra_link_args=["-fopenmp"],
            language="c++",
        )
    ]
)
