"""Every registered method × every tiny family × every backend of the table — parametrized from the
registry and the backend table, so a new method or backend is tested without editing a list."""

import pytest
import torch
from conftest import left_padded
from method_cases import small_options as _small

import attnpatch
from attnpatch.backends import BACKENDS
from attnpatch.registry import method_infos

PREFILL = [m for m in method_infos("prefill") if m.name != "dense"]
DECODE = [m for m in method_infos("decode") if m.name != "dense"]
PREFILL_LENGTH = 300  # long enough that small blocks leave the methods something to drop


@torch.no_grad()
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("info", PREFILL, ids=[m.name for m in PREFILL])
def test_every_prefill_method_runs_and_equals_dense_at_full_density(tiny, info, backend):
    ids, mask = left_padded(2, PREFILL_LENGTH, [0, 37], seed=3)
    valid = mask.bool()
    dense = tiny(ids, attention_mask=mask).logits
    with attnpatch.patch_model(tiny, method=info.name, backend=backend, **_small(info)) as patch:
        out = tiny(ids, attention_mask=mask).logits
        stats = patch.stats()
    assert torch.isfinite(out[valid]).all()
    assert all(d["prefill_calls"] == 1 for d in stats.layers)
    assert stats.density is not None and 0 < stats.density <= 1
    ran = {k.split(": ")[1] for k in stats.backends}
    unavailable = BACKENDS[backend].unavailable(out.device)
    asked = sum(d["prefill_calls"] for d in stats.layers) - sum(stats.dense_fallbacks.values())
    if unavailable is not None:  # it says why, and the reference (or SDPA, for dense calls) ran instead
        assert backend not in ran
        if asked:  # a method running dense on every call (too short, or window layers) asks no backend
            assert any(k.startswith(f"prefill: {backend}: {unavailable}") for k in stats.backend_declined)
    full = dict(_small(info), **info.cls.full_density)
    with attnpatch.patch_model(tiny, method=info.name, backend=backend, **full):
        exact = tiny(ids, attention_mask=mask).logits
    torch.testing.assert_close(exact[valid], dense[valid], atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("info", DECODE, ids=[m.name for m in DECODE])
def test_every_decode_method_generates_and_equals_dense_at_full_density(tiny, info):
    ids, mask = left_padded(2, 40, [0, 6], seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    dense = tiny.generate(ids, **kw)
    with attnpatch.patch_model(tiny, decode=info.name, **_small(info)) as patch:
        out = tiny.generate(ids, **kw)
        stats = patch.stats()
    assert out.sequences.shape == dense.sequences.shape
    assert all(d["decode_calls"] == 5 for d in stats.layers)
    with attnpatch.patch_model(tiny, decode=info.name, **dict(_small(info), **info.cls.full_density)):
        exact = tiny.generate(ids, **kw)
    assert torch.equal(exact.sequences, dense.sequences)
    for a, b in zip(exact.scores, dense.scores, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("pre", PREFILL, ids=[m.name for m in PREFILL])
@pytest.mark.parametrize("dec", DECODE, ids=[m.name for m in DECODE])
def test_prefill_and_decode_methods_compose(llama, pre, dec):
    ids, mask = left_padded(2, PREFILL_LENGTH, [0, 9], seed=6)
    with attnpatch.patch_model(llama, method=pre.name, decode=dec.name, prefill_options=_small(pre),
                               decode_options=_small(dec)) as patch:
        out = llama.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        layer = patch.stats().layers[0]
    assert out.shape == (2, PREFILL_LENGTH + 4)
    assert (layer["prefill_method"], layer["decode_method"]) == (pre.name, dec.name)
    assert layer["prefill_calls"] == 1 and layer["decode_calls"] == 3


def test_the_matrix_is_built_from_a_filled_registry():
    """Guard: an empty table would make every test above vanish at collection instead of failing."""
    assert {"a_shape", "blasst"} <= {m.name for m in PREFILL} and {"streaming", "blasst"} <= {m.name for m in DECODE}
    assert {"reference", "triton", "flex", "flash"} <= set(BACKENDS)


@torch.no_grad()
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_backend_writes_page_lse_or_says_why_not(backend):
    """`BackendPlan.decode_page_lse` on a plan of one backend (and the reference after it): the backend's
    `(out, page_lse)` equal the reference's, or it declined with a reason and the reference ran."""
    from attnpatch.backends import resolve_backend
    from attnpatch.backends.reference.executors import paged_decode_attention
    from attnpatch.backends.reference.page_lse import listed_page_lse
    from attnpatch.sparsity import KeyBounds, PageSelection

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 70, 16, generator=g),
               torch.randn(2, 2, 70, 16, generator=g))
    sel = PageSelection(torch.tensor([0, 2, 4], dtype=torch.int32).expand(2, 2, 3).contiguous(),
                        torch.tensor([[3, 1], [2, 3]], dtype=torch.int32), 16, 70)
    bounds = KeyBounds(key_start=torch.tensor([0, 5]))
    declined: list[str] = []
    (out, lse), ran = resolve_backend({"decode": backend}).decode_page_lse(q, k, v, sel, scale=0.25, bounds=bounds,
                                                                         declined=declined)
    if ran != backend:
        assert ran == "reference" and any(d.startswith(f"decode with page log-sum-exp: {backend}: ") for d in declined)
    visible = torch.arange(70)[None, :] >= torch.tensor([[0], [5]])
    torch.testing.assert_close(out, paged_decode_attention(q, k, v, sel, scale=0.25, bounds=bounds))
    want = listed_page_lse(q, k, sel, 0.25, visible)
    assert torch.equal(torch.isinf(lse), torch.isinf(want))
    torch.testing.assert_close(lse[torch.isfinite(want)], want[torch.isfinite(want)])
