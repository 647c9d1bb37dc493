"""The main job: passkey retrieval on the embedded checkpoint, dense versus a sparse method."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from attnpatch.api import patch_model
from attnpatch.eval.passkey import passkey_sample
from attnpatch.models import load


@dataclass
class DemoRow:
    method: str
    answer: str
    correct: bool
    density: float | None
    prefill_s: float
    fallbacks: dict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_method(model, tokenizer, sample, method: str, max_new_tokens: int = 8, **options) -> DemoRow:
    """Patch, time one prefill, answer greedily, report."""
    ids = tokenizer(sample.prompt, return_tensors="pt").to(model.device)
    with patch_model(model, method=method, **options) as patch:
        model(**ids, use_cache=False)  # warm-up (kernels, allocator)
        patch.reset_stats()
        _sync(model.device)
        start = time.perf_counter()
        model(**ids, use_cache=False)
        _sync(model.device)
        prefill_s = time.perf_counter() - start
        stats = patch.stats()
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    return DemoRow(method, answer, sample.is_correct(answer), stats.density, prefill_s, stats.dense_fallbacks)


def demo(model_name: str = "smollm2", method: str = "a_shape", length: int = 4096, depth: float = 0.5,
         seed: int = 0, max_new_tokens: int = 8, **options) -> list[DemoRow]:
    """Run the demo and print a table; returns the rows."""
    steps = tqdm(total=3, desc="attnpatch demo", unit="step")
    steps.set_postfix_str("loading model")
    model, tok = load(model_name)
    steps.update()
    sample = passkey_sample(tok, target_tokens=length, depth=depth, seed=seed)
    n_tokens = len(tok(sample.prompt).input_ids)
    rows = []
    for name in ("dense", method):
        steps.set_postfix_str(f"running {name}")
        rows.append(run_method(model, tok, sample, name, max_new_tokens, **(options if name == method else {})))
        steps.update()
    steps.close()
    print(f"\nPasskey retrieval on {model_name}: {n_tokens} prompt tokens, needle at depth {depth}, "
          f"passkey {sample.passkey}, {model.device.type} {str(model.dtype).removeprefix('torch.')}")
    print(f"{'method':<10} {'answer':<24} {'correct':<8} {'density':>8} {'prefill ms':>11}")
    for r in rows:
        dens = "-" if r.density is None else f"{r.density:.3f}"
        print(f"{r.method:<10} {r.answer.strip()[:22]!r:<24} {'yes' if r.correct else 'no':<8} {dens:>8} {r.prefill_s * 1e3:>11.1f}")
        for reason, n in r.fallbacks.items():
            print(f"{'':<10} dense fallback x{n}: {reason}")
    ratio = rows[1].prefill_s / rows[0].prefill_s
    print(f"prefill time ratio {method}/dense = {ratio:.2f} ({1 / ratio:.2f}x {'faster' if ratio < 1 else 'slower'}; "
          f"executor: PyTorch reference on {model.device.type})")
    return rows
