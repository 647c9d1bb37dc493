"""Reading a long input on the HF path: InfiniRetri's chunked reading (`read_long`) against a dense prefill
of the same input, on a Llama-3.1-8B-shaped model with random weights.

    python -m attnpatch.bench.long_read --out DIR --layers 32 --lengths 32768,131072

Rows per length (batch 1): the unpatched model's prefill into a DynamicCache (SDPA as torch picks it, then
forced to cuDNN and to flash), asked for the last position's logits only, as `generate` does; and
`read_long` on the model patched with `decode="infiniretri"` (options through `--options`), which reads
`chunk_size` tokens at a time and keeps `budget` of them between chunks. Each row reports the time (median
of the timed runs, CUDA events), the peak GPU memory, and the tokens its cache holds afterwards (what each
generated token then reads). Random weights: the kept tokens mean nothing here; the speed is what is
measured (the fidelity of the reading: `bench/results/eval_decode_infiniretri_smollm2/`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from attnpatch.adapters.cache_arg import cache_kwarg
from attnpatch.bench.hf_prefill import _sdpa_context, build_model, environment, time_calls

SDPA_ROWS = (None, "cudnn", "flash")


@dataclass
class Row:
    name: str
    kind: str  # dense | infiniretri
    length: int
    ms: float = float("nan")
    times_ms: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    cache_tokens: int | None = None
    speedup_vs_best_dense: float | None = None
    note: str = ""


def _dense_row(model, ids: torch.Tensor, sdpa: str | None, repeats: int, warmup: int, device) -> Row:
    row = Row("unpatched, SDPA " + (sdpa or "default"), "dense", ids.shape[1])
    held = {}

    def call():
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), _sdpa_context(sdpa):
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
        held["tokens"] = int(cache.get_seq_length())

    row.times_ms, row.peak_gib = time_calls(call, repeats, warmup, device)
    row.cache_tokens = held["tokens"]
    return row


def _read_row(model, ids: torch.Tensor, options: dict, repeats: int, warmup: int, device) -> Row:
    import attnpatch
    from attnpatch.methods.decode.infiniretri import read_long

    name = "infiniretri" + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
    row = Row(name, "infiniretri", ids.shape[1])
    held = {}
    with attnpatch.patch_model(model, decode="infiniretri", **options):
        def call():
            read = read_long(model, ids)
            held["tokens"], held["kept"] = int(read.cache.get_seq_length()), read.retained

        row.times_ms, row.peak_gib = time_calls(call, repeats, warmup, device)
    row.cache_tokens = held["tokens"]
    row.note = f"{len(held['kept'])} compressions"
    return row


def _guarded(make, name: str, kind: str, length: int, log) -> Row:
    try:
        row = make()
        row.ms = statistics.median(row.times_ms)
        log(f"L={length} {row.name}: {row.ms:.1f} ms, cache {row.cache_tokens} tokens")
        return row
    except Exception as e:  # noqa: BLE001  (a failing configuration is a result, not a crash)
        note = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        log(f"L={length} {name}: FAILED {note}")
        return Row(name, kind, length, note=note)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# Reading a long input — {env['model']} — {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, {env['dtype']}, "
             f"{env['date']}", "", f"Command: `{env['command']}`", "",
             "Dense rows: one prefill into a DynamicCache (logits of the last position only). `infiniretri`: "
             "`read_long` (chunks, scoring, compression). Median of the timed runs, CUDA events; batch 1; "
             "`cache tokens`: what the cache holds afterwards, i.e. what each generated token reads.", "",
             "| L | row | ms | vs best dense | peak GiB | cache tokens | note |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ms = "–" if r["ms"] != r["ms"] else f"{r['ms']:.1f}"
        speed = "–" if r["speedup_vs_best_dense"] is None else f"{r['speedup_vs_best_dense']:.2f}"
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['length']} | {r['name']} | {ms} | {speed} | {peak} | {r['cache_tokens'] or '–'} | "
                     f"{r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnpatch.bench.long_read", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--lengths", default="32768,131072", help="input tokens (comma list)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3.1-8B's depth)")
    p.add_argument("--options", nargs="*", default=[], metavar="K=V", help="infiniretri options, e.g. budget=2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny config (CPU tests)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("long_read needs a CUDA GPU (or --device cpu --tiny)", file=sys.stderr)
        return 2
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        options = {k: int(v) for k, v in (item.split("=", 1) for item in args.options)}
    except ValueError:
        p.error("--lengths takes integers; --options takes K=V with integer values (e.g. budget=2048)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.tiny, device, dtype, layers=args.layers)
    command = "python -m attnpatch.bench.long_read " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment(command, device, dtype, args.tiny, args.layers)
    rows = []
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=device,
                            generator=torch.Generator(device=device).manual_seed(length))
        at = []
        for sdpa in SDPA_ROWS if device.type == "cuda" else (None,):
            at.append(_guarded(lambda s=sdpa, x=ids: _dense_row(model, x, s, args.repeats, args.warmup, device),
                               "unpatched, SDPA " + (sdpa or "default"), "dense", length, print))
        at.append(_guarded(lambda x=ids: _read_row(model, x, options, args.repeats, args.warmup, device),
                           "infiniretri", "infiniretri", length, print))
        dense = [r.ms for r in at if r.kind == "dense" and r.ms == r.ms]
        for r in at:
            r.speedup_vs_best_dense = min(dense) / r.ms if dense and r.ms == r.ms else None
        rows += at
    data = {"environment": env, "rows": [asdict(r) for r in rows]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_read.json").write_text(json.dumps(data, indent=1, allow_nan=True))
    (out / "long_read.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
