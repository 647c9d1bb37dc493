"""GPU correctness: every backend of the table against the exact float32 reference (skipped without CUDA).

Prefill: each backend with a prefill path (`attnpatch.backends.BACKENDS`) on bf16 and fp16 inputs,
GQA, chunked prefill (Lq < Lk), left padding (`KeyBounds(key_start=...)`), sliding windows and
token selections; a backend that declines an input skips with its reason, except where
`MUST_TAKE` says it takes that input. Triton specifics: both main loops with the mask-free prefix
found on the host, BLASST skip rules against the tiled oracle. Decode: each backend with a decode
path, with and without skip rules and padding. Model: a tiny bf16 Llama patched with a_shape and
blasst on each backend against the reference backend. Error: ‖out − ref‖ / ‖ref‖ over the query
rows that see a key, within `TOL` (bf16 2e-2, fp16 5e-3). Gemma-3's head dim 256 (4:1 grouping) in each
of prefill, token selections, skip rules and decode.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnpatch.backends import BACKENDS, reference
from attnpatch.backends.base import Backend
from attnpatch.bench.kernels import skip_qkv
from attnpatch.bench.selections import random_block_selection, random_page_selection
from attnpatch.methods.prefill.blasst import lambda_bound
from attnpatch.sparsity import BlockSelection, KeyBounds, PageSelection, SkipRule, TokenSelection, num_blocks
from attnpatch.sparsity.regions import allowed_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = pytest.mark.parametrize("dtype", list(TOL), ids=lambda t: str(t).removeprefix("torch."))

PREFILL = [n for n, b in BACKENDS.items() if n != "reference" and type(b).prefill is not Backend.prefill]
DECODE = [n for n, b in BACKENDS.items() if n != "reference" and type(b).decode is not Backend.decode]
# Inputs a backend must take on CUDA (declining fails); any other decline skips with the reason.
MUST_TAKE = {
    "triton": {"plain", "gqa", "chunked", "left-padding", "chunked-left-padding", "token", "skip", "decode",
               "gemma-d256", "gemma-d256-b64-chunked-left-padding"},
    "flex": {"plain", "gqa", "chunked", "left-padding", "chunked-left-padding", "window"},
}

# name: (B, Hq, Hkv, Lq, Lk, D, block, key_start or None, window or None)
PREFILL_CASES = {
    "plain": (1, 4, 4, 3000, 3000, 128, 128, None, None),
    "gqa": (2, 8, 2, 3000, 3000, 128, 128, None, None),
    "gqa-d64": (2, 8, 2, 1500, 1500, 64, 64, None, None),
    "block64-d128": (1, 8, 2, 777, 777, 128, 64, None, None),
    "chunked": (2, 8, 2, 1500, 2100, 64, 64, None, None),
    "left-padding": (2, 8, 2, 2000, 2000, 128, 128, (0, 700), None),
    "chunked-left-padding": (2, 8, 2, 500, 2000, 128, 128, (0, 300), None),
    "window": (1, 8, 2, 3000, 3000, 128, 128, None, 1000),
    "gemma-d256": (1, 4, 1, 3000, 3000, 256, 128, None, None),  # Gemma-3's head dim and 4:1 grouping
    "gemma-d256-b64-chunked-left-padding": (2, 4, 1, 700, 2000, 256, 64, (0, 300), None),
}
# other cases: 0.3 only (flex compiles per shape)
DENSITIES = {"plain": (1.0, 0.3), "gqa": (1.0, 0.3), "gemma-d256": (1.0, 0.3)}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (inf if `out` is not finite)."""
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def qkv(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(b, hq, lq, d, device=DEVICE, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, device=DEVICE, generator=g).to(dtype)
    return q, k, v


def real_rows(bounds: KeyBounds, b: int, lq: int, lk: int) -> torch.Tensor:
    """`[B, 1, Lq, 1]` query rows that see at least one key (not left padding)."""
    pos = torch.arange(lq, device=DEVICE) + lk - lq
    start = bounds.first_key(b, DEVICE)
    return (pos.view(1, -1) >= start.view(-1, 1)).view(b, 1, lq, 1)


def run_prefill(name: str, kind: str, q, k, v, sel, bounds: KeyBounds, tile_counts=None) -> torch.Tensor:
    """`BACKENDS[name].prefill`; skips when the backend is unavailable or declines (unless it must take `kind`)."""
    backend = BACKENDS[name]
    why = backend.unavailable(q.device)
    if why is not None:
        pytest.skip(f"{name} unavailable: {why}")
    why = backend.prefill_reason(q, k, v, sel, bounds)
    if why is not None:
        if kind in MUST_TAKE.get(name, ()):
            pytest.fail(f"{name} declined a {kind} input: {why}")
        pytest.skip(f"{name} declines {kind}: {why}")
    return backend.prefill(q, k, v, sel, scale=q.shape[-1] ** -0.5, bounds=bounds, tile_counts=tile_counts)


def case_selection(case: str, density: float, b: int, hq: int, lq: int, lk: int, block: int,
                   bounds: KeyBounds) -> BlockSelection:
    """Every causal block (density 1) or a random selection, clipped to the blocks some query may see
    (as methods hand selections over)."""
    if density >= 1.0 and bounds.is_plain:
        return BlockSelection.causal(b, hq, lq, lk, block, block, DEVICE)
    sel = random_block_selection(b, hq, lk, block, density, seed=len(case), device=DEVICE, q_len=lq)
    if bounds.is_plain:
        return sel
    keep = sel.to_block_mask() & allowed_blocks(b, lq, lk, block, block, bounds, DEVICE)
    return BlockSelection.from_block_mask(keep, block, block, lq, lk)


def case_params():
    for case in PREFILL_CASES:
        for density in DENSITIES.get(case, (0.3,)):
            yield pytest.param(case, density, id=f"{case}-d{density}")


@DTYPES
@pytest.mark.parametrize("case,density", list(case_params()))
@pytest.mark.parametrize("name", PREFILL)
def test_prefill_matches_reference(name: str, case: str, density: float, dtype: torch.dtype):
    b, hq, hkv, lq, lk, d, block, key_start, window = PREFILL_CASES[case]
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype, seed=len(case))
    bounds = KeyBounds(key_start=None if key_start is None else torch.tensor(key_start, device=DEVICE),
                       window=window)
    sel = case_selection(case, density, b, hq, lq, lk, block, bounds)
    out = run_prefill(name, case, q, k, v, sel, bounds)
    ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), sel, bounds=bounds)
    rows = real_rows(bounds, b, lq, lk)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel(out * rows, ref * rows) <= TOL[dtype]


@DTYPES
@pytest.mark.parametrize("d,block", [(128, 64), (256, 64), (256, 128)])
@pytest.mark.parametrize("name", PREFILL)
def test_token_selection_matches_reference(name: str, d: int, block: int, dtype: torch.dtype):
    lq, lk, kept = 1000, 3000, 640
    q, k, v = qkv(1, 8, 2, lq, lk, d, dtype, seed=4)
    r = num_blocks(lq, block)
    g = torch.Generator(device=DEVICE).manual_seed(4)
    pos = torch.randperm(lk, device=DEVICE, generator=g)[:kept].sort().values.to(torch.int32)
    sel = TokenSelection(pos.expand(1, 8, r, kept), torch.full((1, 8, r), kept, dtype=torch.int32, device=DEVICE),
                         block, lq, lk)
    out = run_prefill(name, "token", q, k, v, sel, KeyBounds())
    ref = reference.token_gather_attention(q.float(), k.float(), v.float(), sel)
    assert rel(out, ref) <= TOL[dtype]


@DTYPES
@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("case", ["gqa", "chunked", "block64-d128"])
def test_triton_main_loops_with_prefix_on_host(case: str, variant: int, dtype: torch.dtype):
    """Both main loops (index prefetched one ahead; + TMA loads) with the host-computed mask-free prefix."""
    if BACKENDS["triton"].unavailable(DEVICE) is not None:
        pytest.skip(BACKENDS["triton"].unavailable(DEVICE))
    from attnpatch.backends.triton.block_sparse import block_sparse_attention_triton

    b, hq, hkv, lq, lk, d, block, _, _ = PREFILL_CASES[case]
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype, seed=len(case))
    sel = random_block_selection(b, hq, lk, block, 0.3, seed=1, device=DEVICE, q_len=lq)
    ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), sel)
    out = block_sparse_attention_triton(q, k, v, sel, variant=variant, full_in_kernel=False)
    assert rel(out, ref) <= TOL[dtype]


def _skip_inputs(dtype: torch.dtype, lam: float, d: int = 128):
    hq, hkv, length, block = 8, 2, 2048, 128
    # the sink's scaled score (∝ sink / sqrt(d)) as at head dim 128, so λ skips a like share of tiles
    q, k, v = skip_qkv(1, hq, hkv, length, d, sink=24.0 * (d / 128) ** 0.5, block=block, seed=3, device=DEVICE,
                       dtype=dtype)
    bound = lambda_bound(lam, d ** -0.5)
    sel = BlockSelection.causal(1, hq, length, length, block, block, DEVICE, SkipRule(bound))
    return q, k, v, sel, bound


@DTYPES
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("lam", [1e-3, 0.1])
@pytest.mark.parametrize("name", PREFILL)
def test_skip_rule_matches_tiled_oracle(name: str, lam: float, d: int, dtype: torch.dtype):
    """BLASST skip mode: same tiles skipped as the kernels' tiled oracle (float32), same output
    (head dim 256: whole 128×128 tiles in one pipeline stage)."""
    q, k, v, sel, bound = _skip_inputs(dtype, lam, d)
    tiles = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    out = run_prefill(name, "skip", q, k, v, sel, KeyBounds(), tile_counts=tiles)
    ref, (ref_visited, ref_skipped) = reference.block_sparse_attention_tiled_reference(
        q.float(), k.float(), v.float(), sel, skip_bound=bound, count_tiles=True)
    visited, skipped = (int(x) for x in tiles.tolist())
    assert visited == int(ref_visited)
    assert abs(skipped - int(ref_skipped)) <= 0.01 * visited
    if lam >= 0.1:
        assert skipped > 0.2 * visited, "the inputs are built so that λ = 0.1 skips tiles"
    assert rel(out, ref) <= TOL[dtype]


@DTYPES
@pytest.mark.parametrize("name", PREFILL)
def test_skip_rule_matches_reference_executor(name: str, dtype: torch.dtype):
    """The same skip rule in the reference executor's closed form (float32)."""
    q, k, v, sel, _ = _skip_inputs(dtype, 0.05)
    out = run_prefill(name, "skip", q, k, v, sel, KeyBounds())
    ref = reference.block_sparse_attention(q.float(), k.float(), v.float(), sel)
    assert rel(out, ref) <= 5 * TOL[dtype]


# name: (B, Hq, Hkv, L, D, page, fraction, skip λ or None, key_start or None)
DECODE_CASES = {
    "d64-all": (3, 32, 8, 50_000, 64, 64, 1.0, None, None),
    "d64-sixteenth": (3, 32, 8, 50_000, 64, 64, 1 / 16, None, None),
    "d128-all": (3, 32, 8, 50_000, 128, 64, 1.0, None, None),
    "d128-sixteenth": (3, 32, 8, 50_000, 128, 128, 1 / 16, None, None),
    "left-padding": (2, 32, 8, 20_000, 128, 64, 1 / 4, None, (0, 5000)),
    "skip": (2, 32, 8, 20_000, 128, 128, 1.0, 0.05, None),
    "d256-quarter": (2, 4, 1, 20_000, 256, 64, 1 / 4, None, None),  # Gemma-3's head dim and grouping
    "d256-page128": (2, 4, 1, 20_000, 256, 128, 1 / 16, None, None),
    "d256-skip": (2, 4, 1, 20_000, 256, 128, 1.0, 0.05, None),
}


@DTYPES
@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.parametrize("name", DECODE)
def test_decode_matches_reference(name: str, case: str, dtype: torch.dtype):
    b, hq, hkv, length, d, page, frac, lam, key_start = DECODE_CASES[case]
    q, k, v = qkv(b, hq, hkv, 1, length, d, dtype, seed=5)
    bounds = KeyBounds(key_start=None if key_start is None else torch.tensor(key_start, device=DEVICE))
    scale = d ** -0.5
    if lam is None:
        sel = random_page_selection(b, hkv, length, page, frac, device=DEVICE)
    else:
        q, k, v = skip_qkv(b, hq, hkv, length, d, sink=24.0, block=page, seed=5, device=DEVICE, dtype=dtype)
        q = q[:, :, -1:].contiguous()
        sel = PageSelection.all_pages(b, hkv, length, page, DEVICE, SkipRule(lambda_bound(lam, scale)))
    backend = BACKENDS[name]
    why = backend.unavailable(DEVICE) or backend.decode_reason(q, k, v, sel, bounds)
    if why is not None:
        if "decode" in MUST_TAKE.get(name, ()):
            pytest.fail(f"{name} declined a decode input ({case}): {why}")
        pytest.skip(f"{name} declines decode {case}: {why}")
    tiles = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    out = backend.decode(q, k, v, sel, scale=scale, bounds=bounds, tile_counts=tiles)
    if lam is None:
        ref = reference.paged_decode_attention(q.float(), k.float(), v.float(), sel, scale=scale, bounds=bounds)
    else:  # the split kernels' oracle: same tiles, split boundaries and skip rule
        ref, (_, ref_skipped) = reference.sparse_decode_attention_reference(
            q.float(), k.float(), v.float(), sel, scale=scale, skip_bound=lambda_bound(lam, scale), count_tiles=True)
        assert int(tiles[1]) > 0 and abs(int(tiles[1]) - int(ref_skipped)) <= 0.01 * int(tiles[0])
    assert out.shape == (b, hq, 1, v.shape[-1])
    assert rel(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("method,options", [("a_shape", {"block_size": 64, "local_blocks": 2}),
                                            ("blasst", {"a": 200.0})], ids=["a_shape", "blasst"])
@pytest.mark.parametrize("name", [*PREFILL, "auto"])
@torch.no_grad()
def test_model_backend_matches_reference_backend(name: str, method: str, options: dict):
    """A tiny bf16 Llama (left-padded batch) on `name` against the same patch on the reference backend."""
    import attnpatch
    from attnpatch.testing import tiny_model

    model = tiny_model("llama", head_dim=64, num_attention_heads=4, hidden_size=256).to(DEVICE, torch.bfloat16)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(3, 256, (2, 1000), device=DEVICE, generator=g)
    mask = torch.ones_like(ids)
    mask[1, :200] = 0
    outs, ran = {}, {}
    for backend in ("reference", name):
        with attnpatch.patch_model(model, method=method, backend=backend, **options) as patch:
            outs[backend] = model(ids, attention_mask=mask).logits.float()
            stats = patch.stats()
        ran[backend] = (stats.backends, stats.backend_declined)
    backends, declined = ran[name]
    if name != "auto" and f"prefill: {name}" not in backends:
        kind = "skip" if method == "blasst" else "left-padding"
        if kind in MUST_TAKE.get(name, ()):
            pytest.fail(f"{name} did not run {method}: ran {backends}, declined {declined}")
        pytest.skip(f"{name} declined {method}: {declined}")
    real = mask.bool().unsqueeze(-1)
    err = rel(outs[name] * real, outs["reference"] * real)
    assert math.isfinite(err) and err <= 2e-2, f"{method} on {name}: error {err:.2e}, ran {backends}"
