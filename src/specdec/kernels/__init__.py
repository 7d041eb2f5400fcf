"""Native CPU kernels (a C ABI shared library built by the install step, loaded with ctypes).

`qgemm` multiplies a few activation rows by block-quantised weights (see
``qgemm.cpp``); `packing` turns GGUF blocks or float weights into its layout.
"""

from specdec.kernels.native import (
    KernelUnavailableError,
    LinearKernel,
    PackedWeight,
    available,
    path,
    qgemm,
)

__all__ = ["KernelUnavailableError", "LinearKernel", "PackedWeight", "available", "path", "qgemm"]
