"""Decode-method fidelity on an embedded checkpoint (dense prefill, each decode method vs dense decode).

For each prompt — passkey (attnpatch.eval.passkey, the suite's seeds and depths; `--task passkey`) or
an lm-eval RULER generation task's own prompts, scored as lm-eval scores them (every target in the
answer; e.g. `--task niah_single_1`: the first `--limit` documents, as `lm_eval --limit`) — one dense
prefill is shared by every decode spec: its K/V are loaded into a fresh cache built from the spec's own cache
layers (so Quest's page min / max and Recycled's state start exactly as after a real prefill; a method that
reads the prefill's queries, such as `retrieval` with `index=query_ivf`, gets the same dense prefill run again
under its patch), then

* free run: greedy decoding of `--answer-tokens` tokens with the spec -> passkey accuracy;
* teacher forcing: `--forced-tokens` steps fed dense decoding's own tokens -> per-step top-1 agreement
  with dense, KL(dense ‖ spec) of the next-token distribution, and attention recall (the share of
  each decode call's true softmax mass on the keys the selection read; calls that ran SDPA count 1, the
  Triton all-pages calls of a method's declined steps, e.g. sliding-window layers, are left out).

Also reports decode density (keys read / keys in the context, every layer and step; refresh steps and
dense layers read everything) and the seconds per spec. Runs on CPU (float32) or CUDA (bfloat16).
`--model gemma3-270m`: its sliding-window layers keep their window (decode methods replace full-attention
layers only), restored with the prompt's length so positions and masks are those of the real prefill.

Where lm-eval is not installed (the GPU machine), RULER prompts travel as a file: `--export-prompts FILE`
writes them here (text, targets and lm-eval's document), `--prompts FILE` reads them there, and the answers
come back unscored; `--rescore RUN.json` then scores them here with the task's own `process_results` and
rewrites the run's JSON and table. The JSON and table are written after every prompt, so a run stopped by a
time limit keeps the prompts it finished; `--from-log LOG` rebuilds them from the printed lines of a run that
stopped before this script wrote as it went.

`--kv-dir DIR` keeps each prompt's prefill K/V there (float32 safetensors, ~190 MB per 4K prompt) and
reuses them on the next run with the same task, length and sample, so a budget sweep pays the prefill once.

  nice -n 10 python bench/scripts/decode_fidelity.py --limit 3 --lengths 4096
  python bench/scripts/decode_fidelity.py --limit 20 --lengths 4096 8192 --out $OUT/decode_smollm2
  python bench/scripts/decode_fidelity.py --task niah_single_1 --limit 50 --answer-tokens 16 \
      --forced-tokens 16 --kv-dir /tmp/kv --specs dense quest:budget=256 --out DIR
  python bench/scripts/decode_fidelity.py --model gemma3-270m --task niah_single_1 --limit 25 \
      --lengths 16384 --export-prompts prompts.json      # here; then on the GPU: --prompts prompts.json
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from attnpatch.adapters.cache_arg import cache_kwarg
from attnpatch.api import patch_model
from attnpatch.cache import install_layers
from attnpatch.eval.paired import Paired, paired
from attnpatch.eval.passkey import suite_passkey_sample
from attnpatch.models import load, resolve
from attnpatch.options import resolved_options
from attnpatch.spec import PatchSpec

DEFAULT_SPECS = [
    "dense",
    "quest:budget=256,page_size=16", "quest:budget=1024,page_size=16", "quest:budget=256,page_size=16,group=max",
    "recycled:budget=256,stride=16", "recycled:budget=1024,stride=16",
]


@dataclass(frozen=True)
class Prompt:
    """One prompt of the run, its targets, and how its greedy answer is scored."""

    text: str
    targets: tuple[str, ...]
    depth: float | None
    is_correct: Callable[[str], bool] | None  # None: scored later (`--rescore`), where lm-eval is installed
    doc: dict | None = None  # lm-eval's document (RULER tasks)


def ruler_task(task: str, model: str, length: int, limit: int, seed: int):
    """lm-eval's RULER task `task` at `length` tokens of `model`'s tokenizer, its first `limit` requests
    built after `random.seed(seed)` (lm-eval's `simple_evaluate` seeds with 0: seed 0 gives its prompts;
    RULER draws needles from the global `random`)."""
    from lm_eval.tasks import get_task_dict

    from attnpatch.eval.haystack import offline_essays, ruler_task_manager

    path = resolve(model)
    metadata = {"max_seq_lengths": [length], "pretrained": path, "tokenizer": path}
    random.seed(seed)
    with offline_essays():
        found = get_task_dict([task], ruler_task_manager(metadata))[task]
        found.build_all_requests(limit=limit, rank=0, world_size=1)
    return found


def ruler_scorer(found, doc: dict) -> Callable[[str], bool]:
    """The task's own `process_results` (correct: score 1, every target in the answer)."""
    return lambda answer: found.process_results(doc, [answer])[str(doc["max_length"])] == 1.0


def prompts(task: str, tok, length: int, limit: int, seed: int = 0, model: str = "smollm2") -> list[Prompt]:
    """The run's prompts: passkey samples, or the first `limit` documents of an lm-eval RULER task
    (`ruler_task`), scored by the task's own `process_results`."""
    if task == "passkey":
        out = []
        for i in range(limit):
            s = suite_passkey_sample(tok, length, i, limit)
            out.append(Prompt(s.prompt, (s.passkey,), s.depth, s.is_correct))
        return out
    found = ruler_task(task, model, length, limit, seed)
    return [Prompt(i.args[0], tuple(i.doc["outputs"]), None, ruler_scorer(found, i.doc), i.doc)
            for i in found.instances]


def export_prompts(path: Path, task: str, model: str, length: int, seed: int, items: list[Prompt]) -> None:
    """Write RULER prompts (text, targets, lm-eval's document) for a run where lm-eval is missing."""
    path.write_text(json.dumps({"task": task, "model": model, "length": length, "seed": seed,
                                "prompts": [{"text": p.text, "targets": list(p.targets), "doc": p.doc}
                                            for p in items]}, default=str))


def imported_prompts(path: Path, task: str, model: str, length: int, seed: int, limit: int) -> list[Prompt]:
    """Prompts written by `export_prompts` for this task, model, length and seed; left unscored."""
    data = json.loads(path.read_text())
    want = {"task": task, "model": model, "length": length, "seed": seed}
    got = {k: data.get(k) for k in want}
    if got != want:
        raise SystemExit(f"{path} holds prompts for {got}, not {want}")
    if len(data["prompts"]) < limit:
        raise SystemExit(f"{path} holds {len(data['prompts'])} prompts; --limit asks for {limit}")
    return [Prompt(p["text"], tuple(p["targets"]), None, None, p["doc"]) for p in data["prompts"][:limit]]


def target_position(tok, sample: Prompt) -> int | None:
    """Token index where the first target's first occurrence in the prompt starts (None if absent)."""
    at = sample.text.find(sample.targets[0])
    if at < 0:
        return None
    return len(tok(sample.text[:at], add_special_tokens=True).input_ids)


def prefill(model, ids: torch.Tensor, kv_file: Path | None) -> tuple[list, list, torch.Tensor]:
    """Dense prefill K/V per layer and the first generated token; read from / written to `kv_file`."""
    if kv_file is not None and kv_file.exists():
        t = load_file(str(kv_file), device=str(ids.device))
        n = model.config.num_hidden_layers
        return [t[f"k{i}"] for i in range(n)], [t[f"v{i}"] for i in range(n)], t["first"]
    with torch.no_grad():
        dense_cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): dense_cache})
    first = out.logits[0, -1].argmax()
    keys = [layer.keys for layer in dense_cache.layers]
    values = [layer.values for layer in dense_cache.layers]
    if kv_file is not None:
        kv_file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"k{i}": k.contiguous() for i, k in enumerate(keys)}
        tensors.update({f"v{i}": v.contiguous() for i, v in enumerate(values)})
        save_file({**tensors, "first": first.reshape(1)}, str(kv_file))
    return keys, values, first.reshape(1)


def prefilled_cache(model, spec: PatchSpec, keys: list, values: list, tokens: int,
                    ids: torch.Tensor | None = None) -> DynamicCache:
    """A cache of the spec's decode layers holding the given prefill K/V (per layer) of a `tokens`-long
    prompt; a sliding-window layer, which holds only its window, is told the prompt's length. A decode method
    that reads the prefill's queries (`observes_prefill`, e.g. retrieval's query-IVF index) gets the prompt
    `ids` run through the patched model instead (call it inside the spec's patch): the same dense prefill,
    observed."""
    method = spec.build_decode()
    cache = DynamicCache(config=model.config)
    install_layers(cache, lambda i: method.cache_layer(i, model.config), len(keys))
    cache._attnpatch_installed = True
    if method.observes_prefill and ids is not None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
        return cache
    for layer, k, v in zip(cache.layers, keys, values, strict=True):
        layer.update(k, v)
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = tokens
    return cache


def recall_observer(sink: list):
    """Per decode call: mean over rows and query heads of the softmax mass on the keys read."""

    def observe(call) -> None:
        if call.phase != "decode":
            return
        if call.selection is None:
            if call.backend == "sdpa":  # dense: every key read (a step a method computed itself is left out)
                sink.append(1.0)
            return
        q, k, sel = call.query, call.key, call.selection
        b, hq, _, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        scores = (q.view(b, hkv, hq // hkv, d).float() @ k.float().transpose(-1, -2)) * call.scale
        probs = torch.softmax(scores, -1)  # batch 1, no padding: every cached key is visible
        kept = torch.zeros(b, hkv, lk + sel.page_size, dtype=torch.bool, device=k.device)
        width = sel.indices.shape[-1]
        listed = torch.arange(width, device=k.device) < sel.counts.unsqueeze(-1)
        pos = sel.indices.long().unsqueeze(-1) * sel.page_size + torch.arange(sel.page_size, device=k.device)
        pos = torch.where(listed.unsqueeze(-1), pos, lk).clamp(max=lk).view(b, hkv, -1)
        kept.scatter_(-1, pos, True)
        sink.append(float((probs * kept[..., :lk].unsqueeze(2)).sum(-1).mean()))

    return observe


@torch.no_grad()
def decode_run(model, spec, cache, first: torch.Tensor, steps: int, forced: list[int] | None):
    """Greedy (or teacher-forced) decoding from the prefill's token `first`; logits per step."""
    token, logits_out, tokens = first.view(1, 1), [], []
    for s in range(steps):
        logits = model(input_ids=token, use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1].float()
        logits_out.append(logits)
        nxt = int(logits.argmax(-1)) if forced is None else forced[s]
        tokens.append(nxt)
        token = torch.tensor([[nxt]], device=first.device)
    return tokens, torch.cat(logits_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="embedded checkpoint: smollm2 or gemma3-270m")
    ap.add_argument("--task", default="passkey",
                    help="'passkey' or an lm-eval RULER generation task, e.g. niah_single_1")
    ap.add_argument("--limit", type=int, default=3, help="prompts per length")
    ap.add_argument("--seed", type=int, default=0, help="RULER tasks: seed of the prompts (0: lm-eval's own)")
    ap.add_argument("--kv-dir", default=None, help="keep / reuse each prompt's prefill K/V in this folder")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="decode specs 'name:k=v,...'")
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--forced-tokens", type=int, default=16)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="bench/results/decode_smollm2")
    ap.add_argument("--export-prompts", default=None, metavar="FILE",
                    help="RULER task: write the prompts of --lengths[0] to FILE and stop")
    ap.add_argument("--prompts", default=None, metavar="FILE", help="RULER task: read the prompts from FILE "
                    "(written by --export-prompts; answers left unscored for --rescore)")
    ap.add_argument("--rescore", default=None, metavar="RUN_JSON",
                    help="score an unscored run's answers with lm-eval (rewrites its JSON and table) and stop")
    ap.add_argument("--from-log", default=None, metavar="LOG",
                    help="rebuild a run's JSON (--out) from its printed lines, the prompts every spec finished "
                         "(a run stopped by a time limit before this script wrote after every prompt); with "
                         "--prompts, scored as --rescore scores")
    args = ap.parse_args()
    if args.from_log:
        run_path = runs_from_log(Path(args.from_log), args, Path(args.prompts) if args.prompts else None)
        if args.prompts:
            rescore(run_path, Path(args.prompts))
        return
    if args.rescore:
        rescore(Path(args.rescore), Path(args.prompts) if args.prompts else None)
        return
    if args.answer_tokens < 1 or args.forced_tokens < 1:
        ap.error(f"--answer-tokens and --forced-tokens must be >= 1 (got {args.answer_tokens}, {args.forced_tokens}): "
                 "the agreement, KL and recall come from the teacher-forced steps")
    if (args.export_prompts or args.prompts) and (args.task == "passkey" or len(args.lengths) != 1):
        ap.error("--export-prompts / --prompts take a RULER task and one length")
    if args.export_prompts:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve(args.model))
        items = prompts(args.task, tok, args.lengths[0], args.limit, args.seed, args.model)
        export_prompts(Path(args.export_prompts), args.task, args.model, args.lengths[0], args.seed, items)
        print(f"wrote {len(items)} prompts to {args.export_prompts}")
        return
    names = ["dense"] + [s for s in args.specs if s != "dense"]  # dense first: it is the reference
    specs = [PatchSpec.build("dense", s, backend=args.backend) for s in names]  # validated before loading
    model, tok = load(args.model, device=args.device)
    device = model.device
    command = ("python bench/scripts/decode_fidelity.py "
               + (f"--model {args.model} " if args.model != "smollm2" else "")
               + f"--task {args.task} --seed {args.seed} --limit {args.limit} --lengths "
               f"{' '.join(map(str, args.lengths))} --answer-tokens {args.answer_tokens} --forced-tokens "
               f"{args.forced_tokens} --specs {' '.join(args.specs)}"
               + (f" --prompts {args.prompts}" if args.prompts else ""))
    meta = {"model": args.model, "task": args.task, "seed": args.seed, "limit": args.limit,
            "answer_tokens": args.answer_tokens, "forced_tokens": args.forced_tokens, "device": str(device),
            "dtype": str(model.dtype), "torch": torch.__version__, "command": command}
    task = "" if args.task == "passkey" else f"{args.task}_"
    seed = f"seed{args.seed}_" if args.task != "passkey" and args.seed else ""
    name = "" if args.model == "smollm2" else f"{args.model}_"
    stem = Path(args.out) / f"decode_fidelity_{name}{task}{seed}{str(device).split(':')[0]}_n{args.limit}"
    rows = []
    for length in args.lengths:
        per_spec: dict[str, list] = {name: [] for name in names}
        items = (imported_prompts(Path(args.prompts), args.task, args.model, length, args.seed, args.limit)
                 if args.prompts else prompts(args.task, tok, length, args.limit, args.seed, args.model))
        for i, sample in enumerate(items):
            ids = tok(sample.text, return_tensors="pt").input_ids.to(device)
            t0 = time.time()
            digest = hashlib.sha1(sample.text.encode()).hexdigest()[:12]  # the file belongs to this prompt
            kv_file = (Path(args.kv_dir) / f"{args.model}_{args.task}_L{length}_{i}_{digest}.safetensors"
                       if args.kv_dir else None)
            keys, values, first = prefill(model, ids, kv_file)
            prefill_s = time.time() - t0
            about = {"sample": i, "depth": sample.depth, "target": list(sample.targets), "tokens": ids.shape[1],
                     "target_at": target_position(tok, sample)}
            reference = None
            for spec, name in zip(specs, per_spec, strict=True):
                t0 = time.time()
                recalls: list[float] = []

                def fresh(spec=spec, keys=keys, values=values, ids=ids):
                    return prefilled_cache(model, spec, keys, values, ids.shape[1], ids)

                with patch_model(model, spec) as patch:
                    answer, _ = decode_run(model, spec, fresh(), first, args.answer_tokens - 1, None)
                    handle = patch.observe(recall_observer(recalls))
                    if reference is None:  # the first spec is dense: its greedy tokens are the reference
                        reference = decode_run(model, spec, fresh(), first, args.forced_tokens, None)
                        logits = reference[1]
                    else:
                        _, logits = decode_run(model, spec, fresh(), first, args.forced_tokens, reference[0])
                    handle.remove()
                    stats = patch.stats()
                ref_logits = reference[1]
                text = tok.decode([int(first)] + answer, skip_special_tokens=True)
                logp_ref, logp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
                run = {
                    **about, "correct": None if sample.is_correct is None else sample.is_correct(text),
                    "answer": text,
                    "agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
                    "kl": float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean()),
                    "recall": sum(recalls) / len(recalls) if recalls else 1.0,
                    "min_recall": min(recalls) if recalls else 1.0,
                    "decode_density": stats.decode_density, "seconds": round(time.time() - t0, 2),
                    "prefill_seconds": round(prefill_s, 2), "backends": stats.backends,
                }
                per_spec[name].append(run)
                print(f"L={length} sample {i} {name}: {text!r} correct={run['correct']} "
                      f"agree={run['agreement']:.3f} kl={run['kl']:.4f} recall={run['recall']:.4f} "
                      f"density={_fmt(stats.decode_density)}", flush=True)
            # after every prompt: a run stopped by a time limit keeps the prompts it finished
            write(stem, {**meta, "finished": f"{i + 1} of {len(items)} prompts at L={length}"},
                  rows + spec_rows(specs, per_spec, length), quiet=True)
        rows += spec_rows(specs, per_spec, length)
    write(stem, meta, rows)


def spec_rows(specs: list[PatchSpec], per_spec: dict[str, list], length: int) -> list[dict]:
    """One row per spec at `length`: its runs and their means."""
    rows = []
    for spec, name in zip(specs, per_spec, strict=True):
        runs = per_spec[name]
        rows.append({"spec": name, "decode": spec.decode, "decode_options": dict(spec.decode_options),
                     "resolved_options": resolved_options(spec.build_decode()), "length": length, **run_means(runs),
                     "runs": runs})
    return rows


def run_means(runs: list[dict]) -> dict:
    """A row's figures over its runs: samples, accuracy, and the means of the per-run figures (None where a
    run lacks one, e.g. a method that reports no reads, or seconds in a run rebuilt from its log)."""
    def mean(key):
        values = [r.get(key) for r in runs]
        return None if not values or any(v is None for v in values) else sum(values) / len(values)

    return {"samples": len(runs), "accuracy": accuracy(runs), "agreement": mean("agreement"), "kl": mean("kl"),
            "recall": mean("recall"), "decode_density": mean("decode_density"), "seconds_per_sample": mean("seconds")}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def accuracy(runs: list[dict]) -> float | None:
    """Share of correct answers; None while any answer is unscored."""
    if not runs or any(r["correct"] is None for r in runs):
        return None
    return sum(r["correct"] for r in runs) / len(runs)


_LOG_LINE = re.compile(r"L=(\d+) sample (\d+) (\S+): (.*) correct=\S+ agree=(\S+) kl=(\S+) recall=(\S+) density=(\S+)$")


def runs_from_log(log: Path, args, prompts_path: Path | None) -> Path:
    """A run's JSON rebuilt from its per-prompt lines (answers unscored; targets from `prompts_path`): the
    prompts for which every spec printed a line. Returns the JSON's path (under `--out`)."""
    found: dict[tuple[int, str], dict[int, dict]] = {}
    for line in log.read_text().splitlines():
        m = _LOG_LINE.match(line)
        if m:
            length, i, spec = int(m[1]), int(m[2]), m[3]
            found.setdefault((length, spec), {})[i] = {
                "sample": i, "answer": ast.literal_eval(m[4]), "correct": None, "agreement": float(m[5]),
                "kl": float(m[6]), "recall": float(m[7]), "decode_density": None if m[8] == "–" else float(m[8])}
    if not found:
        raise SystemExit(f"{log} holds no per-prompt lines of this script")
    targets = ([p["targets"] for p in json.loads(prompts_path.read_text())["prompts"]] if prompts_path else None)
    rows = []
    for length in sorted({k[0] for k in found}):
        by_spec = {spec: runs for (n, spec), runs in found.items() if n == length}
        done = sorted(set.intersection(*(set(runs) for runs in by_spec.values())))
        for spec, runs in by_spec.items():
            kept = [dict(runs[i], target=targets[i] if targets else None) for i in done]
            rows.append({"spec": spec, "length": length, **run_means(kept), "runs": kept})
    meta = {"model": args.model, "task": args.task, "seed": args.seed, "limit": min(r["samples"] for r in rows),
            "answer_tokens": args.answer_tokens, "forced_tokens": args.forced_tokens, "device": "see the log",
            "dtype": "see the log", "torch": "see the log",
            "command": f"python bench/scripts/decode_fidelity.py --from-log {log.name} "
                       "(rebuilt from a stopped run's lines)",
            "finished": "the prompts every spec printed (rebuilt from the log)"}
    name = "" if args.model == "smollm2" else f"{args.model}_"
    stem = Path(args.out) / f"decode_fidelity_{name}{args.task}_from_log_n{meta['limit']}"
    write(stem, meta, rows)
    return stem.with_suffix(".json")


def rescore(run_path: Path, prompts_path: Path | None) -> None:
    """Score an unscored run's answers with lm-eval (the task's own `process_results`); rewrite its files."""
    if prompts_path is None:
        raise SystemExit("--rescore needs --prompts FILE: the file the run read its prompts from")
    data = json.loads(run_path.read_text())
    stored = json.loads(prompts_path.read_text())
    docs = [p["doc"] for p in stored["prompts"]]
    found = ruler_task(stored["task"], stored["model"], stored["length"], 1, stored["seed"])
    for row in data["results"]:
        for r in row["runs"]:
            r["correct"] = ruler_scorer(found, docs[r["sample"]])(r["answer"])
        row["accuracy"] = accuracy(row["runs"])
    meta = {k: v for k, v in data.items() if k != "results"}
    write(run_path.with_suffix(""), {**meta, "scored": "afterwards with lm-eval (--rescore)"}, data["results"])


MODEL_TITLES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270m"}


def against_dense(rows: list[dict]) -> list[dict]:
    """Each scored row with `against_dense`: the prompts it loses / wins against the dense row of its length (by
    sample) and McNemar's exact p (`attnpatch.eval.paired`); rows without a scored dense row are left as they are."""
    dense = {r["length"]: r for r in rows if r["spec"] == "dense" and r["accuracy"] is not None}
    out = []
    for r in rows:
        ref = dense.get(r["length"])
        if ref is None or r["accuracy"] is None or r is ref:
            out.append({k: v for k, v in r.items() if k != "against_dense"})
            continue
        by_sample = {run["sample"]: run["correct"] for run in ref["runs"]}
        shared = [run["sample"] for run in r["runs"] if run["sample"] in by_sample]
        mine = {run["sample"]: run["correct"] for run in r["runs"]}
        found = paired([by_sample[i] for i in shared], [mine[i] for i in shared], shared)
        out.append({**r, "against_dense": {"lost": list(found.lost), "won": list(found.won), "p": found.p_value}})
    return out


def write(stem: Path, meta: dict, rows: list[dict], quiet: bool = False) -> None:
    """`stem.json` (meta + rows) and `stem.md` (the table, also printed unless `quiet`)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows = against_dense(rows)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=1))
    task, limit = meta["task"], meta["limit"]
    title = MODEL_TITLES.get(meta["model"], meta["model"])
    lines = [f"# Decode fidelity, {title} ({meta['device']}, {meta['dtype']}), dense prefill", "",
             f"`{meta['command']}`", "",
             (f"Passkey prompts ({limit} per length, depths (i + 0.5) / limit)" if task == "passkey" else
              f"lm-eval `{task}` prompts (its first {limit} documents per length; correct: every target "
              "in the answer, as lm-eval scores it" + (", scored afterwards" if meta.get("scored") else "") + ")")
             + f"; accuracy: greedy answer of {meta['answer_tokens']} tokens; agreement / KL(dense ‖ method): "
             f"{meta['forced_tokens']} teacher-forced steps on dense decoding's tokens; recall: mean share of each "
             "decode call's softmax mass on the keys read (SDPA calls count 1); decode density: keys read / keys "
             "in the context (all layers, steps, KV heads; – where a method computes its steps itself)."
             + (f" Written after {meta['finished']}." if meta.get("finished") else "")
             + " Against dense: the prompts a spec misses where dense answers (lost) and answers where dense misses"
             " (won), and McNemar's exact p for a split at least that uneven (`attnpatch.eval.paired`).", "",
             "| length | decode spec | accuracy | against dense | top-1 agreement | KL | recall | decode density |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "unscored" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        pair = r.get("against_dense")
        vs = "–" if pair is None else Paired(tuple(pair["lost"]), tuple(pair["won"])).summary()
        lines.append(f"| {r['length']} | `{r['spec']}` | {acc} | {vs} | {r['agreement']:.3f} | "
                     f"{r['kl']:.4f} | {r['recall']:.4f} | {_fmt(r['decode_density'])} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
