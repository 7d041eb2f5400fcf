"""Linear layers with weights prepacked for oneDNN (mkldnn) on the CPU, swapped in as modules.

Measured on the project's 2-core machine (8960×1536 weight, cycled out of cache):
prepacked oneDNN matmuls are 1.1–1.4× faster than ``F.linear`` in bfloat16 and
1.4–3.5× in float32 for 1–16 rows (the rows of a decode step or of a verified
draft), so both the step and the cost of verifying k tokens drop. bfloat16
results are bit-identical to ``F.linear``; float32 differ in rounding (~1e-4).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from specdec.models.quant_linear import QuantLinear

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    if os.environ.get("SPECDEC_PACK_LINEARS", "1") == "0":
        return False
    return (
        device.type == "cpu"
        and dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and _prepacking_works(dtype)
    )


@functools.cache
def _prepacking_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacks ``dtype`` on this CPU: its bfloat16 path needs AVX-512
    (BW, VL, DQ) or AVX-NE-CONVERT and raises elsewhere (an AVX2-only CPU), where the
    layers stay ``nn.Linear``. Probed once per dtype on a tiny weight."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
        x = torch.zeros(1, 16, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError as e:
        log.debug("no oneDNN prepacking for %s on this CPU: %s", dtype, e)
        return False
    return True


class PrepackedFloatLinear(nn.Module):
    """A float ``nn.Linear`` (float32 or bfloat16) whose weight oneDNN has prepacked:
    ``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout (not a Parameter). Not
    to be confused with `specdec.kernels.PackedWeight`, quantised blocks for ``qgemm``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = w.dtype
        self.weight_nbytes = w.nbytes
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.dtype}, oneDNN-packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` by a `PrepackedFloatLinear`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PrepackedFloatLinear(child))
                count += 1
    return count


def step_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every linear and norm (an embedding is only indexed)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.weight_nbytes + (module.bias.nbytes if module.bias is not None else 0)
        elif isinstance(module, PrepackedFloatLinear):
            total += module.weight_nbytes + (module.bias.nbytes if module.bias is not None else 0)
        elif isinstance(module, nn.Linear) or type(module).__name__ == "RMSNorm":
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    return total
