"""Print lm-eval's niah_single_1 answers side by side for decode methods (dense prefill): which answers a
decode method gets wrong, and how (e.g. a needle number cut short).

    python bench/scripts/niah_samples.py --length 4096 --limit 8 dense quest:budget=1024 quest:budget=1024,page_size=64
"""

from __future__ import annotations

import argparse

import torch

import attnpatch
from attnpatch.eval.haystack import offline_essays, ruler_task_manager
from attnpatch.models import load, resolve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("decode", nargs="+", help="decode specs ('dense' for the unpatched decode)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--limit", type=int, default=8)
    args = p.parse_args()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tok = load(args.model)
    path = resolve(args.model)
    for spec in args.decode:
        patch = attnpatch.patch_model(model, decode=spec) if spec != "dense" else None
        lm = HFLM(pretrained=model, tokenizer=tok, max_length=args.length + 256, batch_size=1)
        with offline_essays(), torch.no_grad():
            metadata = {"max_seq_lengths": [args.length], "pretrained": path, "tokenizer": path}
            out = simple_evaluate(model=lm, tasks=["niah_single_1"], limit=args.limit, gen_kwargs={"max_gen_toks": 32},
                                  log_samples=True, metadata=metadata, task_manager=ruler_task_manager(metadata))
        right = 0
        for s in out["samples"]["niah_single_1"]:
            answer, target = s["resps"][0][0], s["target"]
            ok = all(t in answer for t in target)
            right += ok
            print(f"{spec}\t{'ok ' if ok else 'BAD'}\t{target}\t{answer[:40]!r}")
        print(f"{spec}: {right}/{len(out['samples']['niah_single_1'])}")
        if patch is not None:
            patch.unpatch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
