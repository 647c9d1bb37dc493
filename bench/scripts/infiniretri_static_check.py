"""SmolLM2, 16K passkey prompts (twice its 8K window) read with `generate_long`: the tokens generated from
the dynamic cache and from a static copy of what was kept (CPU, float32).

    python bench/scripts/infiniretri_static_check.py N [OUT.json]
"""

import json
import sys
import time
from pathlib import Path

import torch

import attnpatch
from attnpatch.eval.suite import suite_passkey_sample
from attnpatch.methods.decode.infiniretri import generate_long
from attnpatch.models import load


def main(n: int, out: Path) -> None:
    model, tok = load("smollm2", dtype=torch.float32)
    rows = []
    with attnpatch.patch_model(model, decode="infiniretri"):
        for i in range(n):
            sample = suite_passkey_sample(tok, 16384, i, n)
            context = tok(sample.context, return_tensors="pt").input_ids
            question = tok(sample.question, add_special_tokens=False, return_tensors="pt").input_ids
            runs = {}
            for impl in ("dynamic", "static"):
                t0 = time.perf_counter()
                new = generate_long(model, context, question, max_new_tokens=8, do_sample=False,
                                    pad_token_id=tok.eos_token_id, cache_implementation=impl)[0]
                runs[impl] = (tok.decode(new, skip_special_tokens=True), time.perf_counter() - t0, new.tolist())
            rows.append({"sample": i, "context_tokens": context.shape[1], "dynamic": runs["dynamic"][0],
                         "static": runs["static"][0], "same_tokens": runs["dynamic"][2] == runs["static"][2],
                         "correct": bool(sample.is_correct(runs["static"][0])),
                         "seconds": [round(runs["dynamic"][1], 1), round(runs["static"][1], 1)]})
            print(rows[-1], flush=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "infiniretri_static.json"))
