"""The held-out task of accuracy-floor calibration: passkey retrieval on prompts of calibration seeds
(disjoint from the calibration data's seeds and from the evaluation suite's)."""

from __future__ import annotations

import torch

from attnpatch.api import patch_model
from attnpatch.eval.passkey import passkey_sample
from attnpatch.spec import PatchSpec

ACCURACY_SEED = 95_000  # calibration data uses 90_000 + i; the suite 1000 + i and 7


def passkey_score(model, tokenizer, spec: PatchSpec | None, length: int, prompts: int) -> float:
    """Share of `prompts` passkey prompts of about `length` tokens answered right (greedy, 8 tokens),
    with the model patched by `spec` (None: as it is)."""
    correct = 0
    for i in range(prompts):
        sample = passkey_sample(tokenizer, target_tokens=max(64, length - 16), depth=(i + 0.5) / prompts,
                                seed=ACCURACY_SEED + i)
        ids = tokenizer(sample.prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            if spec is None:
                out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            else:
                with patch_model(model, spec.for_evaluation()):  # the method, never gated dense
                    out = model.generate(**ids, max_new_tokens=8, do_sample=False,
                                         pad_token_id=tokenizer.eos_token_id)
        correct += sample.is_correct(tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
    return correct / prompts
