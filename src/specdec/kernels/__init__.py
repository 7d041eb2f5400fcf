"""Native CPU kernels (a C ABI shared library built by the install step, loaded with ctypes).

`qgemm` multiplies a few activation rows by block-quantised weights (see
``qgemm.cpp``); `packing` turns GGUF blocks or float weights into its layout.
"""

from specdec.kernels.qgemm import KernelUnavailableError, PackedWeight, available, path, qgemm

__all__ = ["KernelUnavailableError", "PackedWeight", "available", "path", "qgemm"]
