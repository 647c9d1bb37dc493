"""Decode-method fidelity on SmolLM2 (dense prefill, each decode method vs dense decode).

For each prompt — passkey (attnpatch.eval.passkey, the suite's seeds and depths; `--task passkey`) or
an lm-eval RULER generation task's own prompts, scored as lm-eval scores them (every target in the
answer; e.g. `--task niah_single_1`: the first `--limit` documents, as `lm_eval --limit`) — one dense
prefill is shared by every decode spec: its K/V are loaded into a fresh cache built from the spec's own cache
layers (so Quest's page min / max and Recycled's state start exactly as after a real prefill), then

* free run: greedy decoding of `--answer-tokens` tokens with the spec -> passkey accuracy;
* teacher forcing: `--forced-tokens` steps fed dense decoding's own tokens -> per-step top-1 agreement
  with dense, KL(dense ‖ spec) of the next-token distribution, and attention recall (the share of
  each decode call's true softmax mass on the keys the selection read; dense calls count 1).

Also reports decode density (keys read / keys in the context, every layer and step; refresh steps and
dense layers read everything) and the seconds per spec. Runs on CPU (float32) or CUDA (bfloat16).

`--kv-dir DIR` keeps each prompt's prefill K/V there (float32 safetensors, ~190 MB per 4K prompt) and
reuses them on the next run with the same task, length and sample, so a budget sweep pays the prefill once.

  nice -n 10 python bench/scripts/decode_fidelity_smollm2.py --limit 3 --lengths 4096
  python bench/scripts/decode_fidelity_smollm2.py --limit 20 --lengths 4096 8192 --out $OUT/decode_smollm2
  python bench/scripts/decode_fidelity_smollm2.py --task niah_single_1 --limit 50 --answer-tokens 16 \
      --forced-tokens 16 --kv-dir /tmp/kv --specs dense quest:budget=256 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from attnpatch.api import patch_model
from attnpatch.cache import install_layers
from attnpatch.eval.passkey import passkey_sample
from attnpatch.models import load, resolve
from attnpatch.registry import get_method
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
    is_correct: Callable[[str], bool]


def prompts(task: str, tok, length: int, limit: int, seed: int = 0) -> list[Prompt]:
    """The run's prompts: passkey samples, or the first `limit` documents of an lm-eval RULER task, drawn
    after `random.seed(seed)` (lm-eval's `simple_evaluate` seeds with 0: seed 0 gives its prompts) and
    scored by the task's own `process_results` (correct: score 1, every target in the answer)."""
    if task == "passkey":
        out = []
        for i in range(limit):
            s = passkey_sample(tok, target_tokens=length - 16, depth=(i + 0.5) / limit, seed=1000 + i)
            out.append(Prompt(s.prompt, (s.passkey,), s.depth, s.is_correct))
        return out
    from lm_eval.tasks import get_task_dict

    from attnpatch.eval.haystack import offline_essays, ruler_task_manager

    path = resolve("smollm2")
    metadata = {"max_seq_lengths": [length], "pretrained": path, "tokenizer": path}
    random.seed(seed)  # RULER draws needles from the global `random`
    with offline_essays():
        found = get_task_dict([task], ruler_task_manager(metadata))[task]
        found.build_all_requests(limit=limit, rank=0, world_size=1)

    def scorer(doc: dict) -> Callable[[str], bool]:
        return lambda answer: found.process_results(doc, [answer])[str(doc["max_length"])] == 1.0

    return [Prompt(i.args[0], tuple(i.doc["outputs"]), None, scorer(i.doc)) for i in found.instances]


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
        out = model(input_ids=ids, past_key_values=dense_cache, use_cache=True)
    first = out.logits[0, -1].argmax()
    keys = [layer.keys for layer in dense_cache.layers]
    values = [layer.values for layer in dense_cache.layers]
    if kv_file is not None:
        kv_file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"k{i}": k.contiguous() for i, k in enumerate(keys)}
        tensors.update({f"v{i}": v.contiguous() for i, v in enumerate(values)})
        save_file({**tensors, "first": first.reshape(1)}, str(kv_file))
    return keys, values, first.reshape(1)


def prefilled_cache(model, spec: PatchSpec, keys: list, values: list) -> DynamicCache:
    """A cache of the spec's decode layers holding the given prefill K/V (per layer)."""
    method = get_method(spec.decode, "decode").build(dict(spec.decode_options))
    cache = DynamicCache(config=model.config)
    install_layers(cache, lambda i: method.cache_layer(i, model.config), len(keys))
    for layer, k, v in zip(cache.layers, keys, values, strict=True):
        layer.update(k, v)
    cache._attnpatch_installed = True
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
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].float()
        logits_out.append(logits)
        nxt = int(logits.argmax(-1)) if forced is None else forced[s]
        tokens.append(nxt)
        token = torch.tensor([[nxt]], device=first.device)
    return tokens, torch.cat(logits_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="passkey", help="'passkey' or an lm-eval RULER generation task, e.g. niah_single_1")
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
    args = ap.parse_args()
    names = ["dense"] + [s for s in args.specs if s != "dense"]  # dense first: it is the reference
    specs = [PatchSpec.build("dense", s, backend=args.backend) for s in names]  # validated before loading
    model, tok = load("smollm2", device=args.device)
    device = model.device
    rows = []
    for length in args.lengths:
        per_spec: dict[str, list] = {name: [] for name in names}
        for i, sample in enumerate(prompts(args.task, tok, length, args.limit, args.seed)):
            ids = tok(sample.text, return_tensors="pt").input_ids.to(device)
            t0 = time.time()
            digest = hashlib.sha1(sample.text.encode()).hexdigest()[:12]  # the file belongs to this prompt
            kv_file = Path(args.kv_dir) / f"{args.task}_L{length}_{i}_{digest}.safetensors" if args.kv_dir else None
            keys, values, first = prefill(model, ids, kv_file)
            prefill_s = time.time() - t0
            about = {"sample": i, "depth": sample.depth, "target": list(sample.targets), "tokens": ids.shape[1],
                     "target_at": target_position(tok, sample)}
            reference = None
            for spec, name in zip(specs, per_spec, strict=True):
                t0 = time.time()
                recalls: list[float] = []
                with patch_model(model, spec) as patch:
                    answer, _ = decode_run(model, spec, prefilled_cache(model, spec, keys, values), first,
                                           args.answer_tokens - 1, None)
                    handle = patch.observe(recall_observer(recalls))
                    if reference is None:  # the first spec is dense: its greedy tokens are the reference
                        ref_tokens, ref_logits = decode_run(model, spec, prefilled_cache(model, spec, keys, values),
                                                            first, args.forced_tokens, None)
                        reference = (ref_tokens, ref_logits)
                        logits = ref_logits
                    else:
                        _, logits = decode_run(model, spec, prefilled_cache(model, spec, keys, values), first,
                                               args.forced_tokens, reference[0])
                    handle.remove()
                    stats = patch.stats()
                ref_logits = reference[1]
                text = tok.decode([int(first)] + answer, skip_special_tokens=True)
                logp_ref, logp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
                per_spec[name].append({
                    **about, "correct": sample.is_correct(text), "answer": text,
                    "agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
                    "kl": float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean()),
                    "recall": sum(recalls) / len(recalls) if recalls else 1.0,
                    "min_recall": min(recalls) if recalls else 1.0,
                    "decode_density": stats.decode_density, "seconds": round(time.time() - t0, 2),
                    "prefill_seconds": round(prefill_s, 2), "backends": stats.backends,
                })
                print(f"L={length} sample {i} {name}: {per_spec[name][-1]['answer']!r} "
                      f"correct={per_spec[name][-1]['correct']} agree={per_spec[name][-1]['agreement']:.3f} "
                      f"kl={per_spec[name][-1]['kl']:.4f} recall={per_spec[name][-1]['recall']:.4f} "
                      f"density={stats.decode_density:.3f}", flush=True)
        for spec, name in zip(specs, per_spec, strict=True):
            runs = per_spec[name]
            rows.append({
                "spec": name, "decode": spec.decode, "decode_options": dict(spec.decode_options), "length": length,
                "samples": len(runs), "accuracy": sum(r["correct"] for r in runs) / len(runs),
                "agreement": sum(r["agreement"] for r in runs) / len(runs),
                "kl": sum(r["kl"] for r in runs) / len(runs),
                "recall": sum(r["recall"] for r in runs) / len(runs),
                "decode_density": sum(r["decode_density"] for r in runs) / len(runs),
                "seconds_per_sample": sum(r["seconds"] for r in runs) / len(runs), "runs": runs,
            })
    write(rows, args, str(device), str(model.dtype))


def write(rows: list[dict], args, device: str, dtype: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = (f"python bench/scripts/decode_fidelity_smollm2.py --task {args.task} --seed {args.seed} "
               f"--limit {args.limit} --lengths {' '.join(map(str, args.lengths))} --answer-tokens "
               f"{args.answer_tokens} --forced-tokens {args.forced_tokens} --specs {' '.join(args.specs)}")
    meta = {"model": "smollm2", "device": device, "dtype": dtype, "torch": torch.__version__, "command": command}
    task = "" if args.task == "passkey" else f"{args.task}_"
    seed = f"seed{args.seed}_" if args.task != "passkey" and args.seed else ""
    stem = f"decode_fidelity_{task}{seed}{device.split(':')[0]}_n{args.limit}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=1))
    lines = [f"# Decode fidelity, SmolLM2-135M-Instruct ({device}, {dtype}), dense prefill", "",
             f"`{command}`", "",
             (f"Passkey prompts ({args.limit} per length, depths (i + 0.5) / limit)" if args.task == "passkey" else
              f"lm-eval `{args.task}` prompts (its first {args.limit} documents per length; correct: every target "
              "in the answer, as lm-eval scores it)") + "; accuracy: greedy answer of "
             f"{args.answer_tokens} tokens; agreement / KL(dense ‖ method): {args.forced_tokens} teacher-forced "
             "steps on dense decoding's tokens; recall: mean share of each decode call's softmax mass on the "
             "keys read (dense calls count 1); decode density: keys read / keys in the context (all layers, "
             "steps, KV heads).", "",
             "| length | decode spec | accuracy | top-1 agreement | KL | recall | decode density |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['length']} | `{r['spec']}` | {r['accuracy']:.2f} | {r['agreement']:.3f} | "
                     f"{r['kl']:.4f} | {r['recall']:.4f} | {r['decode_density']:.3f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
