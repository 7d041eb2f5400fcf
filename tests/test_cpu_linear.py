"""oneDNN-prepacked linears equal F.linear to rounding (relative to the output's scale)."""

import os

import pytest
import torch
import torch.nn.functional as F
from random_models import random_transformer
from torch import nn

from specdec.models.cpu_linear import (
    PrepackedFloatLinear,
    pack_linears,
    packing_available,
    step_weight_bytes,
)

pytestmark = pytest.mark.skipif(
    not packing_available(torch.float32, torch.device("cpu")), reason="no oneDNN on this CPU build"
)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(64, 32), (97, 45), (300, 129)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches(dtype, tol, shape, bias):
    if not packing_available(dtype, torch.device("cpu")):
        pytest.skip(f"oneDNN does not prepack {dtype} on this CPU")
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=bias).to(dtype)
    packed = PrepackedFloatLinear(lin)
    for m in (1, 2, 3, 5, 8, 16, 33, 64):
        x = torch.randn(m, shape[1]).to(dtype)
        ref = F.linear(x, lin.weight, lin.bias)
        got = packed(x)
        assert got.dtype == dtype and got.shape == ref.shape
        scale = ref.float().abs().max().item()
        assert (got.float() - ref.float()).abs().max().item() <= tol * max(scale, 1.0)


def test_pack_model_keeps_outputs_and_counts_bytes():
    model = random_transformer("qwen2", seed=1, dtype=torch.float32)
    tokens = torch.arange(10)
    ref = model(tokens, torch.arange(10), model.new_cache())
    before = step_weight_bytes(model)
    n = pack_linears(model)
    assert n == 4 * model.config.num_layers + 1
    assert step_weight_bytes(model) == before
    got = model(tokens, torch.arange(10), model.new_cache())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_float64_is_not_packed():
    assert not packing_available(torch.float64, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_available_means_it_packs(dtype):
    """bfloat16 prepacking raises on CPUs without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT:
    there packing_available says no and models keep their nn.Linear layers."""
    lin = nn.Linear(32, 16).to(dtype)
    if packing_available(dtype, torch.device("cpu")):
        x = torch.randn(2, 32).to(dtype)
        torch.testing.assert_close(PrepackedFloatLinear(lin)(x), lin(x), rtol=1e-2, atol=1e-2)
    elif os.environ.get("SPECDEC_PACK_LINEARS", "1") != "0":
        with pytest.raises(RuntimeError):
            PrepackedFloatLinear(lin)
