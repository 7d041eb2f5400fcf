"""The native quantised matmul and its packing (``specdec.kernels``).

- each GGUF block type splits into codes and scales that dequantise bit for bit like
  ``gguf.quants.dequantize``;
- the kernel matches a float64 reference of the same integer sums (activations
  quantised per 32 values exactly as the kernel does) to float32 rounding, and the
  float matmul with the dequantised weights within the error of int8 activations;
- a row's result does not depend on the other rows (k-token passes equal k 1-token
  passes bit for bit), and the portable path equals the AVX-512 VNNI one bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from specdec.kernels import packing, path, qgemm

gguf = pytest.importorskip("gguf")

BLOCK = {"Q4_K": (256, 144), "Q6_K": (256, 210), "Q8_0": (32, 34), "Q5_0": (32, 22),
         "Q4_1": (32, 20), "Q4_0": (32, 18)}  # fmt: skip
F16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2),
              "Q4_0": (0,)}  # fmt: skip


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes of ``n`` rows of ``kind`` blocks with sane fp16 scales."""
    rng = np.random.default_rng(seed)
    size, nbytes = BLOCK[kind]
    raw = rng.integers(0, 256, (n, k // size, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[kind]:
        vals = rng.uniform(-0.05, 0.05, (n, k // size)).astype(np.float16)
        raw[..., off : off + 2] = vals.view(np.uint8).reshape(n, k // size, 2)
    return raw.reshape(n, -1)


def reference(x: torch.Tensor, parts: dict) -> np.ndarray:
    """The kernel's arithmetic in float64: the same activation codes and integer sums."""
    x = x.numpy().astype(np.float32)
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = np.abs(xb).max(-1)
    da = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127).reshape(m, k)
    g = parts["group"]
    u = parts["u"].astype(np.float64).reshape(-1, k // g, g)  # [n, groups, g]
    qg = q.reshape(m, k // g, g)
    isum = np.einsum("ngj,mgj->mng", u, qg)  # exact integer sums
    sums_q = qg.sum(-1)  # [m, groups]
    s = parts["sb_groups"]
    d = np.repeat(parts["d"].astype(np.float64), s, axis=1)
    dm = np.repeat(parts["dm"].astype(np.float64), s, axis=1)
    sc = np.ones_like(d) if parts["sc"] is None else parts["sc"].astype(np.float64)
    mm = sc if parts["m"] is None else parts["m"].astype(np.float64)
    da_g = np.repeat(da.astype(np.float64), 32 // g, axis=1)  # [m, groups]
    y = (isum * (d * sc)[None] * da_g[:, None, :]).sum(-1)
    y -= ((dm * mm)[None] * (da_g * sums_q)[:, None, :]).sum(-1)
    return y


@pytest.mark.parametrize("kind", sorted(BLOCK))
def test_gguf_blocks_split_bit_exactly(kind):
    n, k = 24, 512
    raw = random_blocks(kind, n, k)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    want = gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32)
    parts = packing.split_gguf(raw, kind, n, k)
    np.testing.assert_array_equal(packing.dequantise(parts), want)


@pytest.mark.parametrize("kind", sorted(BLOCK))
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_kernel_matches_reference(kind, m):
    n, k = 40, 512  # 40 columns: the last tile is partial
    parts = packing.split_gguf(random_blocks(kind, n, k, seed=m), kind, n, k)
    w = packing.pack(parts, kind)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    y = qgemm(x, w).numpy()
    ref = reference(x, parts)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(y, ref, atol=2e-5 * scale, rtol=0)
    dense = x.numpy() @ packing.dequantise(parts).T  # activations unquantised
    assert np.abs(y - dense).max() < 0.02 * np.abs(dense).max()


OFFSETS = {"Q4_K": 0, "Q4_1": 0, "Q6_K": 32, "Q4_0": 8, "Q5_0": 16, "Q8_0": 128}


@pytest.mark.parametrize("kind", sorted(BLOCK))
def test_offset_formats_take_the_offset_off_in_integers(kind):
    """Where the offset is a fixed multiple of the scale the kernel starts each group's
    integer sum at -offset * (sum of the activation codes) instead of subtracting a float
    product: the same values to float32 rounding as the general path."""
    n, k = 40, 512
    parts = packing.split_gguf(random_blocks(kind, n, k, seed=5), kind, n, k)
    w = packing.pack(parts, kind)
    assert w.offset == OFFSETS[kind]
    general = packing.pack(parts, kind)
    general.__dict__["offset"] = 0  # the dm * m path, which every format can take
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(1)) * 3
    y, y0 = qgemm(x, w).numpy(), qgemm(x, general).numpy()
    np.testing.assert_allclose(y, y0, atol=2e-5 * np.abs(y0).max(), rtol=0)
    if OFFSETS[kind]:
        assert not np.array_equal(y, y0)  # the other path really ran


def test_float_scheme_offsets():
    w = torch.randn(20, 64)
    assert packing.pack(packing.quantise_float(w, "int8"), "int8").offset == 128
    assert packing.pack(packing.quantise_float(w, "int4"), "int4").offset == 0


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_float_schemes_bound_their_error(scheme):
    w = torch.randn(70, 96, generator=torch.Generator().manual_seed(3))
    parts = packing.quantise_float(w, scheme)
    err = np.abs(packing.dequantise(parts) - w.numpy())
    blocks = w.reshape(70, 3, 32)
    step = (
        (blocks.abs().amax(-1) / 127)
        if scheme == "int8"
        else ((blocks.amax(-1) - blocks.amin(-1)) / 15)
    )
    # half a step, plus the fp16 rounding of the scale (and min) times the largest code
    bound = (
        step * 0.5
        + step * 2**-10 * (127 if scheme == "int8" else 16)
        + 1e-3 * blocks.abs().amax(-1)
    )
    assert (torch.from_numpy(err).reshape(70, 3, 32) <= bound[..., None]).all()
    qw = packing.pack(parts, scheme)
    x = torch.randn(5, 96)
    np.testing.assert_allclose(qgemm(x, qw).numpy(), reference(x, parts), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0"])
def test_rows_do_not_depend_on_each_other(kind):
    n, k = 48, 256
    w = packing.pack(packing.split_gguf(random_blocks(kind, n, k), kind, n, k), kind)
    x = torch.randn(64, k)
    bias = torch.randn(n)
    alone = torch.cat([qgemm(x[i : i + 1], w, bias) for i in range(64)])
    for m in (1, 2, 5, 8, 9, 16, 33, 64):
        assert torch.equal(qgemm(x[:m], w, bias), alone[:m]), m


def test_output_into_a_column_slice_and_bias():
    n, k = 20, 64
    parts = packing.quantise_float(torch.randn(n, k), "int8")
    w = packing.pack(parts, "int8")
    x = torch.randn(3, k)
    bias = torch.randn(n)
    out = torch.full((3, 50), 7.0)
    qgemm(x, w, bias, out=out[:, 10:30])
    assert torch.equal(out[:, 10:30], qgemm(x, w) + bias)
    assert (out[:, :10] == 7).all() and (out[:, 30:] == 7).all()


def test_bad_input_is_refused():
    w = packing.pack(packing.quantise_float(torch.randn(16, 64), "int8"), "int8")
    with pytest.raises(ValueError):
        qgemm(torch.randn(2, 32), w)
    with pytest.raises(ValueError):
        qgemm(torch.randn(2, 64, dtype=torch.float64), w)
    with pytest.raises(packing.UnsupportedQuantError):
        packing.quantise_float(torch.randn(4, 40), "int8")
    with pytest.raises(packing.UnsupportedQuantError):
        packing.split_gguf(np.zeros((1, 18), np.uint8), "IQ2_XS", 1, 32)


PORTABLE_SCRIPT = """
import sys, numpy as np, torch
from specdec.kernels import packing, qgemm, path
out = {}
for kind, raw in np.load(sys.argv[1]).items():
    n, k = 40, 512
    w = packing.pack(packing.split_gguf(raw, kind, n, k), kind)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(0))
    out[kind] = qgemm(x, w).numpy()
np.savez(sys.argv[2], path=path(), **out)
"""


def test_portable_path_equals_vnni_bit_for_bit(tmp_path):
    if path() != "avx512-vnni":
        pytest.skip("this CPU has no AVX-512 VNNI: only the portable path runs here")
    blocks = {kind: random_blocks(kind, 40, 512, seed=7) for kind in BLOCK}
    np.savez(tmp_path / "blocks.npz", **blocks)
    runs = {}
    for flag in ("0", "1"):
        env = {**os.environ, "SPECDEC_QGEMM_PORTABLE": flag}
        out = tmp_path / f"out{flag}.npz"
        subprocess.run(
            [sys.executable, "-c", PORTABLE_SCRIPT, str(tmp_path / "blocks.npz"), str(out)],
            check=True,
            env=env,
        )
        runs[flag] = np.load(out)
    assert str(runs["0"]["path"]) == "avx512-vnni" and str(runs["1"]["path"]) == "portable"
    for kind in BLOCK:
        np.testing.assert_array_equal(runs["0"][kind], runs["1"][kind])


@pytest.mark.parametrize("kind", sorted(BLOCK))
def test_unpack_inverts_pack_and_row_subsets_keep_their_values(kind):
    n, k = 40, 512
    parts = packing.split_gguf(random_blocks(kind, n, k, seed=2), kind, n, k)
    w = packing.pack(parts, kind)
    back = packing.unpack(w)
    for key in ("u", "d", "dm", "sc", "m"):
        if parts[key] is None:
            assert back[key] is None
        else:
            np.testing.assert_array_equal(back[key], parts[key])
    rows = np.array([0, 5, 16, 17, 39])
    x = torch.randn(3, k)
    assert torch.equal(qgemm(x, packing.select_rows(w, rows)), qgemm(x, w)[:, rows])


def test_read_bandwidth_probe_streams_a_buffer():
    from specdec.kernels import native

    assert native.read_bandwidth_gbs(1 / 64, repeats=2) > 0.5  # 16 MiB, a few ms


def test_vnni_peak_with_float_work():
    """The micro-benchmark behind `specdec profile`'s two rooflines: the pure vpdpbusd rate
    and the rate with 1-4 float multiply-adds beside every 8; 0 for a count it has no
    loop for (and everywhere the VNNI path cannot run)."""
    from specdec.kernels import native

    rates = [native.vnni_peak_gmacs(iters=200_000, float_ops_per_8=f) for f in range(5)]
    if path() != "avx512-vnni":
        assert rates == [0.0] * 5
        return
    assert all(r > 0 for r in rates)
    assert native.vnni_peak_gmacs(iters=1000, float_ops_per_8=5) == 0.0
    assert native.vnni_peak_gmacs(iters=1000, float_ops_per_8=-1) == 0.0
