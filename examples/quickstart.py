"""Patch the embedded SmolLM2 checkpoint with ProxyAttn prefill (the dense tail on) and look at the stats: the
passkey answer stays right at about a third of the attention blocks. On a CUDA GPU the prefill runs on the
block-sparse kernels; on a CPU on the exact reference backend (no speedup there)."""

import torch

import attnpatch
from attnpatch.eval.passkey import passkey_sample
from attnpatch.models import load

model, tok = load("smollm2")
sample = passkey_sample(tok, target_tokens=2048, depth=0.5)
ids = tok(sample.prompt, return_tensors="pt").to(model.device)

with torch.no_grad(), attnpatch.patch_model(model, method="proxyattn", dense_tail=1) as patch:
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    stats = patch.stats()

answer = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
print(f"passkey {sample.passkey}: answer {answer!r} correct={sample.is_correct(answer)}")
print(f"prefill density {stats.density:.3f}; layer 0: {stats.layers[0]['density_per_head']}")
print(f"ran on: {stats.backends}")
