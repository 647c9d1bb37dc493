"""The offline long-context suite: methods × lengths × tasks on one model, one JSON per run.

Tasks: `passkey` (attnpatch's generator, greedy answer), `perplexity` (Pride and Prejudice, one
window of the run's length), and lm-eval's RULER tasks that run offline as shipped
(`niah_single_1`, `niah_multikey_2`, `niah_multikey_3`, `ruler_vt`, `ruler_cwe`, `ruler_fwe`), and the
essay-haystack ones through a local essay copy (`attnpatch.eval.haystack`).
Every run is a PatchSpec at one length, and records the spec, the patch's prefill density, skipped
fraction and the backends that ran (and why faster ones declined) next to its scores.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from attnpatch.api import patch_model
from attnpatch.eval.passkey import passkey_sample, suite_passkey_sample
from attnpatch.eval.perplexity import window_perplexity
from attnpatch.models import load, resolve
from attnpatch.spec import PatchSpec

RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
RULER_ESSAY = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue")
OWN_TASKS = ("passkey", "perplexity")
TASKS = OWN_TASKS + RULER_OFFLINE + RULER_ESSAY


def _text(value: Any) -> str:
    """An option value as it appears in a result file name."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, tuple | list):
        return "-".join(_text(v) for v in value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(value))


def _stem(name: str, options: Mapping[str, Any]) -> str:
    return name + "".join(f"_{k}{_text(v)}" for k, v in sorted(options.items()))


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a patch spec at one context length."""

    spec: PatchSpec
    length: int

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.spec.prefill_options)

    @property
    def name(self) -> str:
        """File stem: `a_shape_L4096`, `a_shape_local_blocks4_L4096`; a decode method, a profile or a
        backend other than auto add `_dec-streaming_window256`, `_prof-NAME`, `_on-triton`."""
        spec = self.spec
        parts = [_stem(spec.method, spec.prefill_options)]
        if spec.decode != "dense" or spec.decode_options:
            parts.append("dec-" + _stem(spec.decode, spec.decode_options))
        if spec.profile is not None:
            parts.append("prof-" + _text(spec.profile.name or "unnamed"))
            if spec.profile_shift:
                parts.append(f"shift{_text(spec.profile_shift)}")
            if spec.profile_sparsity is not None:
                parts.append(f"S{_text(spec.profile_sparsity)}")
        if spec.backend != "auto":
            backend = spec.backend if isinstance(spec.backend, str) else \
                "-".join(f"{k}-{v}" for k, v in sorted(spec.backend.items()))
            parts.append("on-" + backend)
        return "_".join(parts) + f"_L{self.length}"


def _with_options(spec: PatchSpec, extra: Mapping[str, Any]) -> PatchSpec:
    if not extra:
        return spec
    return PatchSpec.build(spec.method, spec.decode, prefill_options={**spec.prefill_options, **extra},
                           decode_options=spec.decode_options, profile=spec.profile, backend=spec.backend,
                           allow_other_weights=spec.allow_other_weights, profile_shift=spec.profile_shift,
                           profile_sparsity=spec.profile_sparsity)


def grid_specs(methods: Sequence[str | PatchSpec], options: Mapping[str, Mapping[str, Any]] | None = None,
               decode: str | None = None, backend: str | Mapping[str, str] = "auto") -> list[PatchSpec]:
    """Validated specs of a grid's methods: names or "name:k=v" strings (run with `decode` and
    `backend`) or PatchSpecs (run as they are); `options` adds options to every run of a prefill method."""
    if isinstance(methods, str | PatchSpec):
        raise ValueError("methods is a list of method specs, e.g. ['dense', 'a_shape:local_blocks=4']")
    options = dict(options or {})
    specs = [m if isinstance(m, PatchSpec) else PatchSpec.build(m, decode, backend=backend) for m in methods]
    unknown = sorted(set(options) - {s.method for s in specs})
    if unknown:
        raise ValueError(f"options given for method(s) {unknown} that the grid does not run; "
                         f"its methods: {', '.join(sorted({s.method for s in specs}))}")
    return [_with_options(s, options.get(s.method, {})) for s in specs]


def _passkey(model, tok, length: int, limit: int, long_read: bool = False) -> float:
    """Passkey accuracy; `long_read` (decode `infiniretri`): the context is read chunk by chunk with
    the question appended to each chunk to score what is kept (`generate_long`, as InfiniRetri reads a
    question-answering input), then the answer is generated after the question."""
    correct = 0
    for i in range(limit):
        sample = suite_passkey_sample(tok, length, i, limit)
        with torch.no_grad():
            if long_read:
                from attnpatch.methods.decode.infiniretri import generate_long

                context = tok(sample.context, return_tensors="pt").input_ids
                question = tok(sample.question, add_special_tokens=False, return_tensors="pt").input_ids
                new = generate_long(model, context, question, max_new_tokens=8, do_sample=False,
                                    pad_token_id=tok.eos_token_id)[0]
            else:
                ids = tok(sample.prompt, return_tensors="pt").to(model.device)
                new = model.generate(**ids, max_new_tokens=8, do_sample=False,
                                     pad_token_id=tok.eos_token_id)[0, ids.input_ids.shape[1]:]
        correct += sample.is_correct(tok.decode(new, skip_special_tokens=True))
    return correct / limit


def _ruler(model, tok, task: str, length: int, limit: int, model_path: str, max_gen_toks: int | None = None) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from attnpatch.eval.haystack import offline_essays, ruler_task_manager

    lm = HFLM(pretrained=model, tokenizer=tok, max_length=length + 256, batch_size=1)
    metadata = {"max_seq_lengths": [length], "pretrained": model_path, "tokenizer": model_path}
    with offline_essays():
        out = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=ruler_task_manager(metadata),
                              gen_kwargs=None if max_gen_toks is None else {"max_gen_toks": max_gen_toks},
                              metadata=metadata)
    scores = out["results"][task]
    key = next(k for k in scores if k.startswith(f"{length},"))
    return float(scores[key])


def _fidelity(model, tok, run: RunSpec) -> dict:
    """Attention recall, output error and density on one passkey prompt of the run's length."""
    from attnpatch.eval.fidelity import measure

    ids = tok(passkey_sample(tok, target_tokens=run.length - 16, seed=7).prompt, return_tensors="pt").input_ids
    report, _ = measure(model, ids, run.spec)
    return report.summary() if report.heads else {"density": 1.0, "recall": 1.0, "rel_error": 0.0}


def _notes(run: RunSpec, tasks) -> list[str]:
    """What a reader of the scores must know about how this run's tasks used its methods."""
    others = [t for t in tasks if t != "passkey"]
    if run.spec.decode == "infiniretri" and others:
        return [f"infiniretri reads chunk by chunk in passkey only; {', '.join(others)} ran the model's own "
                "forward / generate over the whole input (dense decode for infiniretri)"]
    return []


def run_one(model, tok, run: RunSpec, tasks, limit: int, model_name: str, model_path: str,
            measure_fidelity: bool = True, max_gen_toks: int | None = None,
            on_task: Callable[[dict], None] | None = None) -> dict:
    """One (spec, length) run over `tasks` (the patch is active for all of them), plus the fidelity of
    the same prefill method on one prompt (attention recall, output error, density). `max_gen_toks`
    caps the RULER tasks' generation (their own setting otherwise: 128 tokens for the NIAH tasks,
    whose answers are a few tokens and scored by inclusion). `on_task` receives the result so far
    (`"complete": False`, the finished tasks' scores) after each task, so a caller can keep the tasks
    of a run that is stopped before its end. The fidelity measurement builds dense attention maps; when
    it runs out of GPU memory its entry records that instead of losing the run's scores."""
    scores: dict[str, float] = {}
    task_seconds: dict[str, float] = {}
    start = time.time()

    def result(stats, fidelity, complete: bool) -> dict:
        return {"model": model_name, "method": run.method, "options": run.options, "decode": run.spec.decode,
                "decode_options": dict(run.spec.decode_options), "spec": run.spec.to_dict(), "length": run.length,
                "limit": limit, "max_gen_toks": max_gen_toks, "scores": dict(scores), "complete": complete,
                "density": stats.density, "skipped_fraction": stats.skipped_fraction,
                "decode_density": stats.decode_density, "dense_fallbacks": stats.dense_fallbacks,
                "backends": stats.backends, "backend_declined": stats.backend_declined,
                "density_per_layer": [d["density"] for d in stats.layers],
                "skipped_per_layer": [d["skipped_tiles"] / d["visited_tiles"] if d["visited_tiles"] else 0.0
                                      for d in stats.layers],
                "fidelity": fidelity, "notes": _notes(run, tasks), "seconds": round(time.time() - start, 1),
                "task_seconds": dict(task_seconds), "device": str(model.device), "dtype": str(model.dtype),
                "torch": torch.__version__}

    with patch_model(model, run.spec.for_evaluation()) as patch:  # the method's scores, never gated
        for task in tasks:
            t0 = time.time()
            if task == "passkey":
                scores[task] = _passkey(model, tok, run.length, limit, long_read=run.spec.decode == "infiniretri")
            elif task == "perplexity":
                from attnpatch.eval.texts import austen

                scores[task] = window_perplexity(model, tok, austen(), run.length)
            else:
                scores[task] = _ruler(model, tok, task, run.length, limit, model_path, max_gen_toks)
            task_seconds[task] = round(time.time() - t0, 1)
            if on_task is not None:
                on_task(result(patch.stats(), None, complete=False))
        stats = patch.stats()
    fidelity = None
    if measure_fidelity:
        try:
            fidelity = _fidelity(model, tok, run)
        except torch.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            fidelity = {"error": f"out of memory: {str(err).splitlines()[0]}"}
    return result(stats, fidelity, complete=True)


def run_grid(model_name: str, methods: Sequence[str | PatchSpec], tasks: Sequence[str], lengths: Sequence[int],
             limit: int, out_dir: str | Path, options: Mapping[str, Mapping[str, Any]] | None = None,
             decode: str | None = None, backend: str | Mapping[str, str] = "auto",
             max_gen_toks: int | None = None) -> list[Path]:
    """Every method × length; returns the JSON files written (one per run). `methods`: names,
    "name:k=v" specs or PatchSpecs; `options`: extra options per prefill method name; `decode` and
    `backend` apply to the methods given as text; `max_gen_toks` caps RULER generations (`run_one`).
    Everything is validated before the model loads."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; offline tasks: {', '.join(TASKS)}")
    if max_gen_toks is not None and (not isinstance(max_gen_toks, int) or max_gen_toks < 1):
        raise ValueError(f"max_gen_toks must be a positive integer or None, got {max_gen_toks!r}")
    bad_lengths = [n for n in lengths if not isinstance(n, int) or n <= 0]
    if bad_lengths or not lengths:
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    runs = [RunSpec(s, n) for s in grid_specs(methods, options, decode, backend) for n in lengths]
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"the grid runs {twice} more than once")
    model, tok = load(model_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for run in tqdm(runs, desc="attnpatch eval"):
        path = out / f"{run.name}.json"

        def save(result: dict, path: Path = path) -> None:
            path.write_text(json.dumps(result, indent=1))

        result = run_one(model, tok, run, tasks, limit, model_name, resolve(model_name), max_gen_toks=max_gen_toks,
                         on_task=save)
        save(result)
        written.append(path)
        tqdm.write(f"{run.name}: {result['scores']} density {result['density']} on {result['backends']}")
    return written
