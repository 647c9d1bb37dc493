"""Passkey prompts of the suite, two prefill specs: A on every prompt, B only on the prompts A loses.

    python bench/scripts/passkey_pairs.py 4096 20 proxyattn:gamma=0.95 proxyattn:gamma=0.95,dense_tail=1 [OUT.json]

Same prompts as `attnpatch eval --tasks passkey` (`suite_passkey_sample`), greedy 8 tokens,
the reference backend (CPU), the embedded SmolLM2. Prints one row per prompt: A's answer and density,
and B's where A failed. A quick way to ask "does B rescue what A loses" at half the cost of two full runs;
B's accuracy on A's successes needs a full `attnpatch eval` of B.
"""

import json
import sys

import torch

from attnpatch import patch_model
from attnpatch.eval.passkey import suite_passkey_sample
from attnpatch.models import load


def main() -> None:
    length, limit, a, b = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    out = sys.argv[5] if len(sys.argv) > 5 else None
    model, tok = load("smollm2")

    def run(spec: str, i: int) -> tuple[int, str, float]:
        s = suite_passkey_sample(tok, length, i, limit)
        ids = tok(s.prompt, return_tensors="pt").to(model.device)
        with patch_model(model, spec, backend="reference") as p, torch.no_grad():
            new = model.generate(**ids, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.eos_token_id)[0, ids.input_ids.shape[1]:]
            density = p.stats().density
        text = tok.decode(new, skip_special_tokens=True)
        return int(s.is_correct(text)), text, density

    rows = []
    for i in range(limit):
        ok, text, density = run(a, i)
        row = {"i": i, "a": ok, "a_text": text, "a_density": density}
        if not ok:
            row["b"], row["b_text"], row["b_density"] = run(b, i)
        rows.append(row)
        print(row, flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"length": length, "limit": limit, "a": a, "b": b, "device": str(model.device),
                       "dtype": str(model.dtype), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
