"""The offline long-context suite: methods × lengths × tasks on one model, one JSON per run.

Tasks: `passkey` (attnpatch's generator, greedy answer), `perplexity` (Pride and Prejudice, one
window of the run's length), and lm-eval's RULER tasks that run offline as shipped
(`niah_single_1`, `niah_multikey_2`, `niah_multikey_3`, `ruler_vt`, `ruler_cwe`, `ruler_fwe`), and the
essay-haystack ones through a local essay copy (`attnpatch.eval.haystack`).
Every run records the patch's prefill density and skipped fraction next to its scores.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attnpatch.api import patch_model
from attnpatch.eval.passkey import passkey_sample
from attnpatch.eval.perplexity import window_perplexity
from attnpatch.models import load, resolve

RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
RULER_ESSAY = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue")
OWN_TASKS = ("passkey", "perplexity")
TASKS = OWN_TASKS + RULER_OFFLINE + RULER_ESSAY


@dataclass(frozen=True)
class RunSpec:
    method: str
    length: int
    options: dict

    @property
    def name(self) -> str:
        opts = "".join(f"_{k}{v}" for k, v in sorted(self.options.items()))
        return f"{self.method}{opts}_L{self.length}"


def _passkey(model, tok, length: int, limit: int) -> float:
    correct = 0
    for i in range(limit):
        sample = passkey_sample(tok, target_tokens=length - 16, depth=(i + 0.5) / limit, seed=1000 + i)
        ids = tok(sample.prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        correct += sample.is_correct(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
    return correct / limit


def _ruler(model, tok, task: str, length: int, limit: int, model_path: str) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from attnpatch.eval.haystack import offline_essays

    lm = HFLM(pretrained=model, tokenizer=tok, max_length=length + 256, batch_size=1)
    with offline_essays():
        out = simple_evaluate(model=lm, tasks=[task], limit=limit,
                              metadata={"max_seq_lengths": [length], "pretrained": model_path, "tokenizer": model_path})
    scores = out["results"][task]
    key = next(k for k in scores if k.startswith(f"{length},"))
    return float(scores[key])


def _fidelity(model, tok, spec: RunSpec) -> dict:
    """Attention recall, output error and density on one passkey prompt of the run's length."""
    from attnpatch.eval.fidelity import measure

    ids = tok(passkey_sample(tok, target_tokens=spec.length - 16, seed=7).prompt, return_tensors="pt").input_ids
    report, _ = measure(model, ids, spec.method, **spec.options)
    return report.summary() if report.heads else {"density": 1.0, "recall": 1.0, "rel_error": 0.0}


def run_one(model, tok, spec: RunSpec, tasks, limit: int, model_name: str, model_path: str,
            measure_fidelity: bool = True) -> dict:
    """One (method, options, length) run over `tasks` (the patch is active for all of them), plus the
    fidelity of the same method on one prompt (attention recall, output error, density)."""
    scores: dict[str, float] = {}
    start = time.time()
    with patch_model(model, method=spec.method, **spec.options) as patch:
        for task in tasks:
            if task == "passkey":
                scores[task] = _passkey(model, tok, spec.length, limit)
            elif task == "perplexity":
                from attnpatch.eval.texts import austen

                scores[task] = window_perplexity(model, tok, austen(), spec.length)
            else:
                scores[task] = _ruler(model, tok, task, spec.length, limit, model_path)
        stats = patch.stats()
    fidelity = _fidelity(model, tok, spec) if measure_fidelity else None
    return {"model": model_name, "method": spec.method, "options": spec.options, "length": spec.length,
            "limit": limit, "scores": scores, "density": stats.density, "skipped_fraction": stats.skipped_fraction,
            "dense_fallbacks": stats.dense_fallbacks,
            "density_per_layer": [d["density"] for d in stats.layers],
            "skipped_per_layer": [d["skipped_tiles"] / d["visited_tiles"] if d["visited_tiles"] else 0.0
                                  for d in stats.layers],
            "fidelity": fidelity, "seconds": round(time.time() - start, 1),
            "device": str(model.device), "dtype": str(model.dtype), "torch": torch.__version__}


def run_grid(model_name: str, methods: list[str], tasks: list[str], lengths: list[int], limit: int,
             out_dir: str | Path, options: dict[str, dict] | None = None) -> list[Path]:
    """Every method × length; returns the JSON files written (one per run)."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; offline tasks: {', '.join(TASKS)}")
    model, tok = load(model_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    specs = [RunSpec(m, n, (options or {}).get(m, {})) for m in methods for n in lengths]
    for spec in tqdm(specs, desc="attnpatch eval"):
        result = run_one(model, tok, spec, tasks, limit, model_name, resolve(model_name))
        path = out / f"{spec.name}.json"
        path.write_text(json.dumps(result, indent=1))
        written.append(path)
        tqdm.write(f"{spec.name}: {result['scores']} density {result['density']}")
    return written
