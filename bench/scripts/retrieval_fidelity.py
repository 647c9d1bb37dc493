"""Dense decode vs `retrieval` decode (RetrievalAttention) on passkey: accuracy through attnpatch's
eval suite, plus, per retrieval setting, the GPU / CPU bytes of the KV and the index's recall@top_k
on one prompt per length.

CPU (a few minutes):
    nice -n 10 python bench/scripts/retrieval_fidelity.py --limit 4
GPU (the lead's run):
    python bench/scripts/retrieval_fidelity.py --limit 20 --lengths 4096 8192 --out $OUT/decode_retrieval
Writes `retrieval_fidelity.json` and `.md` under `--out` (default bench/results/decode_retrieval),
with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from attnpatch import patch_model, retrieval_report
from attnpatch.eval.passkey import passkey_sample
from attnpatch.eval.suite import RunSpec, run_one
from attnpatch.models import load, resolve
from attnpatch.spec import PatchSpec

SETTINGS = (
    "retrieval:n_sink=16,window=256,top_k=128,index=exact",
    "retrieval:n_sink=16,window=256,top_k=128,index=query_ivf,cluster_size=32,n_probe=8,n_train=256",
)


def _memory_and_recall(model, tok, spec: PatchSpec, length: int) -> dict:
    """Bytes per part and recall@top_k (exact search run alongside) on one passkey prompt."""
    options = dict(spec.decode_options, track_recall=True)
    tracked = PatchSpec.build(spec.method, spec.decode, decode_options=options, backend=spec.backend)
    ids = tok(passkey_sample(tok, target_tokens=length - 16, seed=7).prompt, return_tensors="pt").to(model.device)
    start = time.time()
    with torch.no_grad(), patch_model(model, tracked):
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id,
                             return_dict_in_generate=True)
    report = retrieval_report(out.past_key_values)
    report.pop("per_layer", None)
    report["seconds_with_recall_tracking"] = round(time.time() - start, 1)
    report["prompt_tokens"] = ids.input_ids.shape[1]
    return report


def _table(rows: list[dict]) -> str:
    lines = ["| decode | length | passkey | GPU share of KV | GPU MB | CPU MB | recall@k "
             "| keys scanned / step·head | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("memory") or {}

        def fmt(x, spec=".3f"):
            return "—" if x is None else format(x, spec)

        lines.append(f"| {r['decode_spec']} | {r['length']} | {r['scores']['passkey']:.2f} | "
                     f"{fmt(m.get('gpu_fraction'))} | {fmt(m.get('gpu_bytes', 0) / 2**20, '.1f') if m else '—'} | "
                     f"{fmt(m.get('cpu_bytes', 0) / 2**20, '.1f') if m else '—'} | {fmt(m.get('recall'))} | "
                     f"{fmt(m.get('mean_scanned'), '.0f')} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model name or path (default: %(default)s)")
    p.add_argument("--limit", type=int, default=4, help="passkey samples per length (default: %(default)s)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096], help="context lengths (default: %(default)s)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS),
                   help="decode specs compared with dense (default: two retrieval settings)")
    p.add_argument("--out", default="bench/results/decode_retrieval", help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    if args.limit < 1 or any(n < 256 for n in args.lengths):
        p.error("--limit must be >= 1 and every length >= 256")
    specs = [PatchSpec.build("dense", "dense")] + [PatchSpec.build("dense", s) for s in args.settings]
    model, tok = load(args.model)
    rows = []
    for length in args.lengths:
        for spec in specs:
            run = RunSpec(spec, length)
            row = run_one(model, tok, run, ["passkey"], args.limit, args.model, resolve(args.model),
                          measure_fidelity=False)
            row["decode_spec"] = spec.decode + "".join(f",{k}={v}" for k, v in spec.decode_options.items())
            row["memory"] = _memory_and_recall(model, tok, spec, length) if spec.decode == "retrieval" else None
            print(f"{row['decode_spec']} L={length}: passkey {row['scores']['passkey']:.2f} "
                  f"memory {row['memory']}", flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    result = {"what": "dense vs retrieval decode on passkey (prefill dense); memory and recall@top_k on one prompt "
                      "per length with the exact search run alongside", "command": command,
              "device": str(model.device), "dtype": str(model.dtype), "rows": rows}
    (out / "retrieval_fidelity.json").write_text(json.dumps(result, indent=1, default=str))
    md = (f"# Retrieval decode fidelity ({args.model}, {model.device}, {model.dtype})\n\n`{command}`\n\n"
          f"Passkey accuracy over {args.limit} samples per length (prefill dense, greedy, 8 new tokens); GPU share "
          "of KV = bytes kept on the device / bytes a dense cache of the same tokens holds (full-attention layers); "
          "CPU MB include float32 keys, values and the index; recall@k = share of the exact top-k offloaded keys "
          "the index retrieved, averaged over layers, steps and query heads.\n\n" + _table(rows) + "\n")
    (out / "retrieval_fidelity.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
