"""BLASST on the embedded checkpoint: passkey accuracy and perplexity versus dense, for a sweep of `a`.

    python bench/blasst_sweep.py --out bench/results/blasst_smollm2   [--lengths 4096,8192] [--a 4,32,256]
    python -m attnpatch.bench.blasst_sweep ...                          (the same)

Runs on CPU (float32) or GPU; writes <out>.json and <out>.md. Dense (a = 0) is the reference row.
`--decode-a` also runs BLASST in decoding (`decode="blasst"`, its own `a` in `decode_options`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch


def patch_kwargs(method: str, a: float, decode_a: float, convention: str) -> dict[str, Any]:
    """`patch_model` arguments of one sweep point: dense, BLASST prefill (options flat), or BLASST in
    both phases (each phase's `a` in `prefill_options` / `decode_options`: both methods declare it)."""
    if method == "dense":
        return {"method": "dense"}
    if not decode_a:
        return {"method": "blasst", "a": a, "convention": convention}
    return {"method": "blasst", "decode": "blasst", "prefill_options": {"a": a, "convention": convention},
            "decode_options": {"a": decode_a, "convention": convention}}


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from tqdm.auto import tqdm

    import attnpatch
    from attnpatch.eval.passkey import passkey_sample
    from attnpatch.eval.perplexity import window_perplexity
    from attnpatch.eval.texts import austen
    from attnpatch.models import load

    model, tok = load(args.model, dtype=torch.float32 if args.device == "cpu" else None, device=args.device)
    text = austen("prideprejudice")
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    configs = [("dense", 0.0, 0.0)] + [("blasst", float(a), float(da))
                                       for a in args.a.split(",") for da in args.decode_a.split(",")]
    rows = []
    bar = tqdm(total=len(configs) * len(lengths) * (len(depths) + 1), desc="blasst sweep")
    for method, a, decode_a in configs:
        for length in lengths:
            with attnpatch.patch_model(model, **patch_kwargs(method, a, decode_a, args.convention)) as patch:
                ppl = window_perplexity(model, tok, text, length)
                ppl_stats = patch.stats()
                bar.update()
                correct = []
                for i, depth in enumerate(depths):
                    sample = passkey_sample(tok, target_tokens=length - 16, depth=depth, seed=100 + i)
                    ids = tok(sample.prompt, return_tensors="pt").to(model.device)
                    with torch.no_grad():
                        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
                    correct.append(sample.is_correct(tok.decode(out[0, ids.input_ids.shape[1]:])))
                    bar.update()
                stats = patch.stats()
            layers = ppl_stats.layers
            row = {
                "method": method, "a": a, "decode_a": decode_a, "convention": args.convention, "length": length,
                "lambda_prefill": (a / length) if a else 0.0,
                "perplexity": ppl, "passkey_accuracy": sum(correct) / len(correct), "passkey_n": len(correct),
                "prefill_skipped_fraction": ppl_stats.skipped_fraction,
                "prefill_skipped_per_layer": [d["skipped_fraction"] for d in layers],
                "decode_skipped_fraction": decode_skipped(stats),
                "backends": stats.backends,
            }
            rows.append(row)
            tqdm.write(json.dumps({k: v for k, v in row.items() if k != "prefill_skipped_per_layer"}))
    bar.close()
    return {"model": args.model, "device": args.device, "dtype": str(model.dtype),
            "text": "Pride and Prejudice, first N tokens", "passkey_depths": depths, "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "rows": rows}


def decode_skipped(stats) -> float | None:
    """Mean over layers of the share of decode tiles skipped (None when no layer skipped in decoding)."""
    vals = [d["decode_skipped_fraction"] for d in stats.layers if d["decode_skipped_fraction"] is not None]
    return sum(vals) / len(vals) if vals else None


def markdown(data: dict[str, Any]) -> str:
    lines = [f"# BLASST on {data['model']} ({data['device']}, {data['dtype']})", "",
             f"Command: `{data['command']}` — {data['date']}, torch {data['torch']}", "",
             f"Perplexity: {data['text']}. Passkey: depths {data['passkey_depths']}, greedy 8 tokens.", "",
             "| L | method | a | λ = a/L | prefill skipped | decode_a | decode skipped | perplexity | passkey |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        skip = "-" if r["prefill_skipped_fraction"] is None else f"{r['prefill_skipped_fraction']:.3f}"
        dskip = "-" if r["decode_skipped_fraction"] is None else f"{r['decode_skipped_fraction']:.3f}"
        lines.append(f"| {r['length']} | {r['method']} | {r['a']:g} | {r['lambda_prefill']:.2e} | {skip} | "
                     f"{r['decode_a']:g} | {dskip} | {r['perplexity']:.3f} | "
                     f"{r['passkey_accuracy']:.2f} ({r['passkey_n']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = "python -m attnpatch.bench.blasst_sweep") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="4096,8192")
    p.add_argument("--depths", default="0.2,0.5,0.8")
    p.add_argument("--a", default="4,32,256,2048")
    p.add_argument("--decode-a", default="0", help="comma list; every (a, decode_a) pair is run (0: dense decode)")
    p.add_argument("--convention", default="scaled", choices=("scaled", "raw"))
    p.add_argument("--out", default="bench/results/blasst_smollm2")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    data = run(args, f"{prog} " + " ".join(argv))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
