"""HF-path prefill benchmark: a 2-layer Llama-3.1-8B-shaped model (random weights, bf16) timed end to end
through transformers (`model.model(input_ids)`: embeddings, 2 decoder layers, final norm; no LM head,
no cache), unpatched and patched.

    python -m attnpatch.bench.hf_prefill --out DIR --lengths 32768,131072

Rows: the unpatched model (SDPA as transformers and torch pick it, then forced to cuDNN and to flash
through `torch.nn.attention.sdpa_kernel`), `patch_model(model, "dense")` (attnpatch's dispatch in
front of SDPA: the hook's overhead), `patch_model(model, "dense", backend="flash")` (flash-attn-4's
dense causal kernel; skipped with the reason when unavailable), and sparse rows (`a_shape` with
block 128 and 16 local blocks, `blasst`) on `--sparse-backends` (default "auto"), each with the
backends that ran and why faster ones declined (`patch.stats()`). Median of `--repeats` runs timed
with CUDA events after `--warmup` runs (flash-attn-4 and Triton compile at first use). Writes
`hf_prefill.json` and `hf_prefill.md`. `--device cpu --tiny` runs a tiny config (tests).

`--planted`: random weights give near-uniform attention, on which score-based methods keep most blocks
(the time then measures their overhead, not their savings); with this flag every attention call computes
with planted synthetic Q/K (`attnpatch.bench.synthetic.planted_qkv`: sinks, local band, vertical
stripes, slashes, needles; the same tensors in every layer) in place of its own, so each method chooses
the densities of the layer-level benchmark `attnpatch.bench.methods` and the time to first token shows
what they save end to end. Dense rows cost the same on either input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnpatch.backends import BACKENDS
from attnpatch.backends.base import Backend
from attnpatch.bench.timing import timed_ms

LLAMA31_8B: dict[str, Any] = dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
    vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, num_hidden_layers=2,
    tie_word_embeddings=False,
)
TINY: dict[str, Any] = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
    vocab_size=256, rope_theta=500000.0, max_position_embeddings=4096, num_hidden_layers=2, tie_word_embeddings=False,
)
# Sparse rows: (name, method, options), for the full-size model and for --tiny.
SPARSE = (("a_shape", "a_shape", {"block_size": 128, "local_blocks": 16}), ("blasst", "blasst", {}))
SPARSE_TINY = (("a_shape", "a_shape", {"block_size": 16, "local_blocks": 2}), ("blasst", "blasst", {"block_size": 16}))


@dataclass
class Row:
    """One configuration at one length."""

    name: str
    kind: str  # dense | sparse
    length: int
    batch: int
    ms: float = float("nan")
    times_ms: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    speedup_vs_unpatched: float | None = None
    speedup_vs_best_dense: float | None = None
    backends: dict[str, int] = field(default_factory=dict)
    backend_declined: dict[str, int] = field(default_factory=dict)
    dense_fallbacks: dict[str, int] = field(default_factory=dict)
    density: float | None = None
    skipped_fraction: float | None = None
    note: str = ""


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0, layers: int | None = None):
    """The Llama-3.1-8B-shaped (or tiny) model with random weights and SDPA attention, on `device`
    (2 layers unless `layers` says otherwise; 32 is the full 8B model's depth, for time to first token)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**dict(TINY if tiny else LLAMA31_8B, **({"num_hidden_layers": layers} if layers else {})))
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int,
               device: torch.device) -> tuple[list[float], float | None]:
    """Milliseconds of each of `repeats` calls after `warmup` calls (CUDA events on CUDA, else wall
    clock) and the peak GPU memory over the timed calls (None off CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed_ms(fn, device)[0] for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return times, peak


def _sdpa_context(name: str | None):
    """`sdpa_kernel` forcing one SDPA backend ("cudnn" | "flash"), or no context for None."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def flash_dense_reason(device: torch.device) -> str | None:
    """Why `patch_model(model, "dense", backend="flash")` cannot run flash-attn-4 here, or None."""
    flash = BACKENDS.get("flash")
    if flash is None:
        return "no flash backend in the table"
    why = flash.unavailable(device)
    if why is None and type(flash).dense is Backend.dense:
        why = "the flash backend has no dense path in this build"
    return why


@dataclass
class Config:
    """One row's recipe: a patch (method, backend, options) or none, and an SDPA backend to force."""

    name: str
    kind: str
    method: str | None = None
    backend: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    sdpa: str | None = None
    unavailable: str | None = None


def configs(device: torch.device, tiny: bool, sparse_backends: list[str],
            methods: list[str] | None = None) -> Iterator[Config]:
    """The rows: dense baselines, then sparse rows (`methods`: spec strings; default SPARSE)."""
    from attnpatch.spec import PatchSpec

    yield Config("unpatched (SDPA default)", "dense")
    yield Config("unpatched, SDPA cuDNN", "dense", sdpa="cudnn")
    yield Config("unpatched, SDPA flash", "dense", sdpa="flash")
    yield Config("dense (attnpatch dispatch → SDPA)", "dense", method="dense")
    yield Config("dense on flash-attn-4", "dense", method="dense", backend="flash",
                 unavailable=flash_dense_reason(device))
    sparse = SPARSE_TINY if tiny else SPARSE
    if methods:
        specs = [PatchSpec.parse(text) for text in methods]
        sparse = tuple((text, spec.method, dict(spec.prefill_options))
                       for text, spec in zip(methods, specs, strict=True))
    for backend in sparse_backends:
        for name, method, options in sparse:
            yield Config(f"{name} ({backend})", "sparse", method=method, backend=backend, options=options)


def run_row(model, ids: torch.Tensor, cfg: Config, repeats: int, warmup: int, log=print,
            planted: tuple[torch.Tensor, torch.Tensor] | None = None) -> Row:
    """Time `model.model(ids)` under `cfg`; never raises (a failure is a row with a note). `planted`:
    (query, key) every attention call sees instead of its own (`planted_attention`)."""
    import attnpatch

    device = ids.device
    row = Row(cfg.name, cfg.kind, ids.shape[1], ids.shape[0])
    if cfg.unavailable is not None:
        row.note = f"skipped: {cfg.unavailable}"
        log(f"L={row.length} {cfg.name}: {row.note}")
        return row

    def call():
        with torch.no_grad(), _sdpa_context(cfg.sdpa):
            return model.model(input_ids=ids, use_cache=False)

    try:
        def planting():
            return contextlib.nullcontext() if planted is None else planted_attention(model, *planted)

        if cfg.method is None:
            with planting():
                row.times_ms, row.peak_gib = time_calls(call, repeats, warmup, device)
        else:
            with attnpatch.patch_model(model, cfg.method, backend=cfg.backend, **cfg.options) as patch, planting():
                row.times_ms, row.peak_gib = time_calls(call, repeats, warmup, device)
                stats = patch.stats()
            row.backends, row.backend_declined = stats.backends, stats.backend_declined
            row.dense_fallbacks, row.density, row.skipped_fraction = (
                stats.dense_fallbacks, stats.density, stats.skipped_fraction)
        row.ms = statistics.median(row.times_ms)
        log(f"L={row.length} {cfg.name}: {row.ms:.2f} ms {row.backends or ''}")
    except Exception as e:  # noqa: BLE001  (a failing configuration is a result, not a crash)
        row.note = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"L={row.length} {cfg.name}: FAILED {row.note}")
    finally:
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    return row


@contextlib.contextmanager
def planted_attention(model, query: torch.Tensor, key: torch.Tensor) -> Iterator[None]:
    """Every attention call of `model` sees `query` / `key` (e.g. `attnpatch.bench.synthetic.planted_qkv`'s,
    with the sinks, local band, stripes, slashes and needles of real attention) instead of its own
    post-RoPE query and key, whatever function runs it (SDPA, attnpatch's patch): the attention function
    registered under the model's current implementation name is wrapped while the context lasts. Random
    weights give near-uniform attention, on which score-based methods keep most blocks; with planted Q/K
    a method chooses the densities of `attnpatch.bench.methods`, and the time to first token shows them."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    had_local = name in ALL_ATTENTION_FUNCTIONS._local_mapping
    inner = ALL_ATTENTION_FUNCTIONS[name]

    def attend(module, q, k, v, *args, **kwargs):
        if q.shape != query.shape or k.shape != key.shape:
            raise ValueError(f"planted Q/K are {tuple(query.shape)} / {tuple(key.shape)}, the call's "
                             f"{tuple(q.shape)} / {tuple(k.shape)}")
        return inner(module, query, key, v, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[name] = attend
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS[name] = inner
        else:
            del ALL_ATTENTION_FUNCTIONS[name]


def add_speedups(rows: list[Row]) -> None:
    """Speedup of every timed row over the unpatched model and over the fastest dense row, per length."""
    for length in {r.length for r in rows}:
        at = [r for r in rows if r.length == length and r.ms == r.ms]
        base = next((r.ms for r in at if r.name.startswith("unpatched (")), None)
        dense = [r.ms for r in at if r.kind == "dense"]
        best = min(dense) if dense else None
        for r in at:
            r.speedup_vs_unpatched = base / r.ms if base else None
            r.speedup_vs_best_dense = best / r.ms if best else None


def default_repeats(length: int) -> int:
    """Few repeats at long context (a 128K prefill of the 2-layer model takes ~0.5–1 s)."""
    return 5 if length <= 32768 else 3


def environment(command: str, device: torch.device, dtype: torch.dtype, tiny: bool,
                layers: int | None = None) -> dict[str, Any]:
    import platform

    import transformers

    from attnpatch.bench.kernels import _package_version, flash_attn_version

    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "triton": _package_version("triton"),
        "flash_attn": flash_attn_version(),
        "python": platform.python_version(), "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": "tiny Llama" if tiny else f"Llama-3.1-8B-shaped, {layers or 2} layers, random weights",
        "config": TINY if tiny else LLAMA31_8B,
        "backends": {name: b.unavailable(device) or "available" for name, b in BACKENDS.items()},
    }


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None or x != x else format(x, spec)


def _counts(d: dict[str, int]) -> str:
    return "; ".join(f"{k} ×{v}" for k, v in d.items()) or "–"


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# HF-path prefill — {env['model']} — {env['gpu'] or env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, triton {env['triton']}, "
             f"flash-attn {env['flash_attn']}, {env['dtype']}, {env['date']}", "",
             f"Command: `{env['command']}`", "",
             "`model.model(input_ids)` (no LM head, no cache), median of the timed runs (CUDA events; wall clock "
             "off CUDA). "
             "Speedups: over the unpatched model and over the fastest dense row at that length. "
             "Backends / declined: counts of attention calls over warm-up and timed runs. Attention inputs: "
             f"{env.get('attention_inputs', 'the model’s own Q/K')}.", "",
             "| L | row | ms | vs unpatched | vs best dense | peak GiB | density | skipped | backends that ran "
             "| declined | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(
            f"| {r['length']} | {r['name']} | {_fmt(r['ms'])} | {_fmt(r['speedup_vs_unpatched'])} | "
            f"{_fmt(r['speedup_vs_best_dense'])} | {_fmt(r['peak_gib'])} | {_fmt(r['density'], '.3f')} | "
            f"{_fmt(r['skipped_fraction'], '.3f')} | {_counts(r['backends'])} | {_counts(r['backend_declined'])} | "
            f"{r['note'] or ''} |")
    return "\n".join(lines) + "\n"


def write(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_prefill.json").write_text(json.dumps(data, indent=1, allow_nan=True))
    (out / "hf_prefill.md").write_text(markdown(data))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnpatch.bench.hf_prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/hf_prefill", help="output folder")
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default: 5 up to 32K, else 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation)")
    p.add_argument("--sparse-backends", default="auto",
                   help=f"backends of the sparse rows (comma list of auto, {', '.join(BACKENDS)})")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="a tiny config (CPU tests), not the 8B-shaped one")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default 2; 32 = Llama-3.1-8B's depth, time to first token)")
    p.add_argument("--planted", action="store_true",
                   help="every attention call sees planted synthetic Q/K (attnpatch.bench.synthetic) instead of "
                        "the random model's near-uniform ones, so score-based methods choose realistic densities")
    p.add_argument("--methods", nargs="+", default=None,
                   help="sparse rows as method specs, e.g. a_shape:block_size=128,local_blocks=16 xattention")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("hf_prefill needs a CUDA GPU (or --device cpu --tiny)", file=sys.stderr)
        return 2
    sparse_backends = [b for b in args.sparse_backends.split(",") if b]
    unknown = [b for b in sparse_backends if b != "auto" and b not in BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {unknown}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    command = "python -m attnpatch.bench.hf_prefill " + " ".join(sys.argv[1:] if argv is None else argv)
    data: dict[str, Any] = {"environment": environment(command, device, dtype, args.tiny, args.layers), "rows": []}
    if args.planted:
        data["environment"]["attention_inputs"] = ("planted synthetic Q/K (attnpatch.bench.synthetic.planted_qkv), "
                                                   "the same in every layer, instead of the random model's own")
    model = build_model(args.tiny, device, dtype, layers=args.layers)
    vocab = model.config.vocab_size
    rows: list[Row] = []
    for length in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cpu").manual_seed(length)
        ids = torch.randint(0, vocab, (args.batch, length), generator=g).to(device)
        repeats = args.repeats or default_repeats(length)
        planted = None
        if args.planted:
            from attnpatch.bench.synthetic import planted_qkv

            c = model.config
            q, k, _ = planted_qkv(args.batch, c.num_attention_heads, c.num_key_value_heads, length, c.head_dim,
                                  device=device, dtype=dtype)
            planted = (q, k)
        for cfg in configs(device, args.tiny, sparse_backends, args.methods):
            rows.append(run_row(model, ids, cfg, repeats, args.warmup, planted=planted))
            add_speedups(rows)
            data["rows"] = [asdict(r) for r in rows]
            write(data, Path(args.out))  # results so far survive a time limit
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
