"""On CUDA: every backend of the table, through `patch_model`, against the reference backend (bf16), on
the HF path — plain, left-padded and sliding-window inputs, dense on an explicit backend, and the
auto order's choice. Skipped without a GPU."""

import pytest
import torch

import attnpatch
from attnpatch.backends import AUTO_ORDER, BACKENDS
from attnpatch.testing import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PREFILL_BACKENDS = [name for name, b in BACKENDS.items() if name != "reference"]


def _model(family: str = "llama", window: int | None = None):
    # head dim 64 and 128-blocks: shapes every fast backend takes
    model = tiny_model(family, sliding_window=window, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, max_position_embeddings=4096, intermediate_size=512)
    if family in ("qwen2", "qwen3") and window is not None:
        model.config.layer_types = ["full_attention", "sliding_attention"]
    return model.to("cuda", torch.bfloat16)


def _ids(batch: int, length: int, pads=()):
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 256, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        ids[row, :p], mask[row, :p] = 0, 0
    return ids.cuda(), mask.cuda()


def _logits(model, ids, mask, **patch):
    with attnpatch.patch_model(model, **patch) as p, torch.no_grad():
        out = model(ids, attention_mask=mask).logits.float()
        return out, p.stats()


def _close(a, b, mask):
    valid = mask.bool()
    err = (a[valid] - b[valid]).norm() / b[valid].norm()
    assert err < 2e-2, f"relative error {err:.3e}"


@pytest.mark.parametrize("backend", PREFILL_BACKENDS)
@pytest.mark.parametrize("case", ["plain", "left-padded", "window"])
def test_sparse_prefill_on_each_backend_matches_the_reference(backend, case):
    family, window, pads = "llama", None, ()
    if case == "left-padded":
        pads = (0, 300)
    if case == "window":
        family, window = "mistral", 512
    model = _model(family, window)
    ids, mask = _ids(2, 1536, pads)
    opts = dict(method="a_shape", block_size=128, local_blocks=3)
    ref, _ = _logits(model, ids, mask, backend="reference", **opts)
    out, stats = _logits(model, ids, mask, backend=backend, **opts)
    _close(out, ref, mask)
    ran = set(stats.backends)
    if f"prefill: {backend}" not in ran:  # it declined: the reason is in the stats, the reference ran
        assert ran == {"prefill: reference"}
        assert any(k.startswith(f"prefill: {backend}: ") for k in stats.backend_declined)


def test_auto_takes_the_first_backend_that_accepts():
    model = _model()
    ids, mask = _ids(1, 2048)
    _, stats = _logits(model, ids, mask, method="a_shape", block_size=128, local_blocks=3)
    ran = next(iter(stats.backends))
    first = next(n for n in AUTO_ORDER["prefill"] if BACKENDS[n].unavailable(torch.device("cuda")) is None)
    assert ran == f"prefill: {first}", (stats.backends, stats.backend_declined)
    _, stats = _logits(model, ids, mask, method="blasst", a=1024.0)
    assert set(stats.backends) == {"prefill: triton"}  # flash has no skip rule: it declines, with the reason
    if BACKENDS["flash"].unavailable(torch.device("cuda")) is None:
        assert any("skip" in k for k in stats.backend_declined)


@pytest.mark.skipif(BACKENDS["flash"].unavailable(torch.device("cuda")) is not None
                    if torch.cuda.is_available() else True, reason="flash-attn-4 unavailable")
@pytest.mark.parametrize("pads", [(), (0, 200)])
def test_dense_on_flash_matches_sdpa(pads):
    model = _model()
    ids, mask = _ids(2, 1024, pads)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.float()
    out, stats = _logits(model, ids, mask, backend="flash")
    assert set(stats.backends) == {"prefill: flash"}
    _close(out, ref, mask)
    auto, stats = _logits(model, ids, mask)  # dense on auto stays SDPA, bit-identical
    assert set(stats.backends) == {"prefill: sdpa"} and torch.equal(auto, ref)


def test_sparse_decode_on_triton_generates_like_the_reference():
    model = _model()
    ids, mask = _ids(2, 700, (0, 50))
    outs = {}
    for backend in ("triton", "reference"):
        with attnpatch.patch_model(model, decode="blasst", decode_options={"a": 16.0, "page_size": 64},
                                   backend=backend) as p, torch.no_grad():
            outs[backend] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                           pad_token_id=0)
            stats = p.stats()
        assert f"decode: {backend}" in stats.backends
    assert (outs["triton"] == outs["reference"]).float().mean() > 0.9


def test_gemma3_head_dim_256_runs_on_the_reference_and_says_why_the_fast_backends_declined():
    """Gemma 3's head dim 256 (tiny config, one sliding and one full layer): the Triton kernels take head
    dims up to 128, and flash-attn-4 on SM90 needs 80-key tiles for it, so 128-blocks run on the reference."""
    model = tiny_model("gemma3", sliding_window=256, hidden_size=256, head_dim=256, intermediate_size=512,
                       max_position_embeddings=4096).to("cuda", torch.bfloat16)
    ids, mask = _ids(1, 1024)
    out, stats = _logits(model, ids, mask, method="a_shape", block_size=128, local_blocks=2)
    assert torch.isfinite(out).all() and not stats.dense_fallbacks
    assert set(stats.backends) == {"prefill: reference"}
    full = stats.layers[1]  # the full-attention layer (the sliding one is declined for its window first)
    why = {k.split(": ")[1]: k for k in full["backend_declined"]}
    assert set(why) == {"flash", "triton"}
    if BACKENDS["triton"].unavailable(torch.device("cuda")) is None:
        assert "head dim 256" in why["triton"]
    if BACKENDS["flash"].unavailable(torch.device("cuda")) is None:
        assert "head dim 256" in why["flash"] or "head dim <= 128" in why["flash"]
