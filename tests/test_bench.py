"""CPU checks of the benchmark scripts: the code paths that need no GPU (table loop, outputs, HF path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnpatch.backends import BACKENDS

REPO = Path(__file__).resolve().parents[1]


def test_hf_prefill_tiny_on_cpu(tmp_path):
    from attnpatch.bench import hf_prefill

    assert hf_prefill.main(["--device", "cpu", "--tiny", "--lengths", "64", "--repeats", "1", "--warmup", "0",
                            "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "hf_prefill.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {c.name for c in hf_prefill.configs(torch.device("cpu"), True, ["auto"])}
    base = rows["unpatched (SDPA default)"]
    assert base["ms"] > 0 and base["speedup_vs_unpatched"] == pytest.approx(1.0)
    assert rows["unpatched, SDPA cuDNN"]["note"]  # no cuDNN on CPU: the error is the result
    if hf_prefill.flash_dense_reason(torch.device("cpu")) is not None:
        assert rows["dense on flash-attn-4"]["note"].startswith("skipped: ")
    for name in ("a_shape (auto)", "blasst (auto)"):
        assert rows[name]["ms"] > 0 and rows[name]["speedup_vs_best_dense"] > 0
        assert sum(rows[name]["backends"].values()) == 2  # 2 layers, 1 call each
        if BACKENDS["triton"].unavailable(torch.device("cpu")) is not None:
            assert rows[name]["backends"] == {"prefill: reference": 2}
            assert any(k.startswith("prefill: triton: ") for k in rows[name]["backend_declined"])
    assert rows["a_shape (auto)"]["density"] < 1.0
    assert "| 64 | a_shape (auto) |" in (tmp_path / "hf_prefill.md").read_text()


def test_planted_attention_replaces_query_and_key_for_sdpa_and_a_patch():
    """Under `planted_attention` every attention call of the model (unpatched SDPA, or attnpatch's
    patch) computes with the planted Q/K, the registry is as before afterwards, and a method's selection
    follows the planted structure."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import attnpatch
    from attnpatch.bench import hf_prefill
    from attnpatch.bench.synthetic import planted_qkv

    model = hf_prefill.build_model(True, torch.device("cpu"), torch.float32)
    c = model.config
    ids = torch.randint(0, c.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    q, k, _ = planted_qkv(1, c.num_attention_heads, c.num_key_value_heads, 128, c.head_dim, device="cpu",
                          dtype=torch.float32, band=16, stripes=2, slashes=2, needles=2)
    sdpa, seen = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def spy(module, query, key, *args, **kwargs):
        seen.append((query, key))
        return sdpa(module, query, key, *args, **kwargs)

    with torch.no_grad():
        plain = model.model(ids).last_hidden_state
        ALL_ATTENTION_FUNCTIONS["sdpa"] = spy  # what the planted wrapper delegates to
        try:
            with hf_prefill.planted_attention(model, q, k):
                planted = model.model(ids).last_hidden_state
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is spy
        finally:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
        with attnpatch.patch_model(model, "xattention", block_size=16, stride=4, threshold=0.9) as patch:
            model.model(ids)
            flat = patch.stats().density
        with attnpatch.patch_model(model, "xattention", block_size=16, stride=4, threshold=0.9) as patch:
            with hf_prefill.planted_attention(model, q, k):
                model.model(ids)
            structured = patch.stats().density
    assert len(seen) == c.num_hidden_layers and all(a is q and b is k for a, b in seen)
    assert not torch.allclose(plain, planted)
    assert structured < flat  # planted Q/K: fewer blocks than the random model's near-uniform attention


def test_kernels_prefill_rows_on_cpu(tmp_path, monkeypatch):
    from attnpatch.bench import kernels

    monkeypatch.setitem(kernels.SHAPES, "tiny", (4, 2, 64))
    rows = kernels.bench_prefill(["tiny"], [256], [1.0, 0.5], [1], block=64, device="cpu", dtype=torch.float32,
                                 backends=["triton", "flex", "flash"], log=lambda *_: None)
    flex = [r for r in rows if r.table_backend == "flex"]
    assert len(flex) == 2 and all(r.ms > 0 and r.backend == "flex" for r in flex)
    triton = [r for r in rows if r.table_backend == "triton"]
    if BACKENDS["triton"].unavailable(torch.device("cpu")) is not None:  # no CUDA tensors, no interpreter
        assert len(triton) == 1 and triton[0].note.startswith("unavailable: ")
    kernels.write_results(rows, kernels.environment("test", ["triton", "flex", "flash"]), tmp_path)
    md = (tmp_path / "kernels.md").read_text()
    assert "flex ms" in md and "Not measured" in md
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"][0]["table_backend"] is None


def test_kernels_table_reads_the_committed_results():
    from attnpatch.bench.kernels import prefill_table

    data = json.loads((REPO / "bench/results/kernels.json").read_text())
    table = prefill_table(data["rows"]).splitlines()
    committed = [line for line in (REPO / "bench/results/kernels.md").read_text().splitlines()
                 if line.startswith("| llama3-8b") or line.startswith("| qwen") or line.startswith("| smollm2")]
    assert "attnpatch-triton ms" in table[0] and "flex ms" in table[0]
    assert len([line for line in table if line.startswith("| ") and "ms" not in line]) == len(committed)


def test_bench_kernels_help_and_check_without_gpu(capsys):
    from attnpatch.bench import check
    from attnpatch.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "kernels", "--help"])
    assert exit_info.value.code == 0
    assert "--backends" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert check.main([]) == 2


def test_blasst_sweep_patch_arguments():
    from attnpatch.bench.blasst_sweep import patch_kwargs
    from attnpatch.spec import PatchSpec

    both = PatchSpec.build(**patch_kwargs("blasst", 64.0, 16.0, "raw"))
    assert (both.method, both.decode) == ("blasst", "blasst")
    assert both.prefill_options["a"] == 64.0 and both.decode_options["a"] == 16.0
    assert both.prefill_options["convention"] == both.decode_options["convention"] == "raw"
    prefill = PatchSpec.build(**patch_kwargs("blasst", 64.0, 0.0, "scaled"))
    assert (prefill.method, prefill.decode, prefill.prefill_options["a"]) == ("blasst", "dense", 64.0)
    assert PatchSpec.build(**patch_kwargs("dense", 0.0, 0.0, "scaled")).method == "dense"


def test_method_benchmark_smoke_on_cpu(tmp_path):
    """`attnpatch.bench.methods` runs every row on CPU at a tiny size and writes its table."""
    import json

    from attnpatch.bench.methods import main

    assert main(["--out", str(tmp_path), "--shapes", "tiny", "--lengths", "256", "--device", "cpu",
                 "--dtype", "float32", "--methods", "a_shape:block_size=16,local_blocks=2",
                 "blasst:block_size=16"]) == 0
    rows = json.loads((tmp_path / "methods.json").read_text())["rows"]
    got = {r["spec"] or r["name"]: r for r in rows}
    assert got["a_shape:block_size=16,local_blocks=2"]["density"] < 1 and got["blasst:block_size=16"]["select_ms"] >= 0
    assert got["a_shape:block_size=16,local_blocks=2"]["backend"] == "reference"


def test_planted_inputs_have_sinks_and_a_local_band():
    import torch

    from attnpatch.bench.synthetic import planted_qkv

    q, k, _ = planted_qkv(1, 2, 1, 1024, 32, device="cpu", dtype=torch.float32)
    s = (q[0, 0] @ k[0, 0].T) / 32 ** 0.5
    p = torch.softmax(s.masked_fill(torch.ones(1024, 1024, dtype=torch.bool).triu(1), float("-inf")), -1)
    assert p[512:, :4].sum(-1).mean() > 0.1  # the sinks draw mass from far queries
    near = torch.stack([p[i, i - 64: i + 1].sum() for i in range(512, 1024, 64)]).mean()
    assert near > 1.5 * 65 / 768  # the band: well above a uniform share of 65 keys around position 768


def test_method_benchmark_peer_row_real_inputs_and_replot(tmp_path):
    """The peer row times a peer's op from a file and converts its full-square ratio to causal block
    pairs; `--real` adds rows on Q/K/V captured from the embedded checkpoint; `--plot-only` redraws."""
    import json

    from attnpatch.bench.methods import main

    peer = tmp_path / "peer_op.py"
    peer.write_text(
        "import torch\n"
        "def flex_prefill_attention(q, k, v, gamma, tau, min_budget, block_size, return_computational_ratio):\n"
        "    assert q.dim() == 4 and q.shape[1] == k.shape[1]  # [B, L, H, D]\n"
        "    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),\n"
        "        v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)\n"
        "    return out, 0.5\n")
    out = tmp_path / "out"
    assert main(["--out", str(out), "--shapes", "tiny", "--lengths", "256", "--device", "cpu", "--dtype", "float32",
                 "--methods", "a_shape:block_size=16,local_blocks=2", "--peer-flexprefill", str(peer),
                 "--real", "smollm2:128:3"]) == 0
    rows = json.loads((out / "methods.json").read_text())["rows"]
    peer_row = next(r for r in rows if r["name"] == "peer:flexprefill" and r["shape"] == "tiny")
    assert abs(peer_row["density"] - 0.5 * 4 / 3) < 1e-9 and peer_row["total_ms"] > 0  # 2 blocks of 128
    real = [r for r in rows if r["shape"] == "smollm2-L3"]
    assert {r["name"] for r in real} >= {"sdpa-cudnn", "a_shape", "peer:flexprefill"}
    assert next(r for r in real if r["name"] == "a_shape")["density"] < 1
    replot = tmp_path / "replot"
    assert main(["--plot-only", str(out / "methods.json"), "--out", str(replot)]) == 0
    assert (replot / "methods.md").read_text() == (out / "methods.md").read_text()


def test_method_benchmark_refuses_a_bad_real_input_spec(capsys):
    import pytest

    from attnpatch.bench.methods import main

    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--real", "smollm2:8k"])
    assert "MODEL:LENGTH:LAYER" in capsys.readouterr().err


def test_hf_decode_tiny_on_cpu(tmp_path):
    """Every registered decode method gets a row (eager on a DynamicCache for one that refuses a static
    cache; a compiled row it cannot take: its reason), dense baselines, eager and compiled ("eager" dynamo
    backend on CPU), KV memory; a spent budget skips."""
    from attnpatch.bench import hf_decode
    from attnpatch.options import option_specs
    from attnpatch.registry import method_infos

    assert hf_decode.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "64", "--batches", "2",
                           "--modes", "eager,compiled", "--compile-backend", "eager", "--baselines", "dense,triton",
                           "--steps", "2", "--repeats", "1", "--warmup", "0", "--page-size", "16",
                           "--decode-options", "blasst:page_size=16,a=4", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "hf_decode.json").read_text())
    rows = {(r["mode"], r["name"]): r for r in data["rows"]}
    methods = [m for m in method_infos("decode") if m.name != "dense"]
    for mode in ("eager", "compiled"):
        for m in methods:
            name = "blasst:page_size=16,a=4" if m.name == "blasst" else m.name
            row = rows[(mode, name)]
            if mode == "compiled" and m.cls.static_cache_reason is not None:  # eager rows on a DynamicCache
                assert row["note"].startswith(f"skipped: {m.cls.static_cache_reason}")
            elif mode == "compiled" and m.cls.compiled_step_reason is not None:
                assert row["note"] == f"skipped: {m.cls.compiled_step_reason}"
            elif mode == "compiled" and m.cls.fullgraph_reason is not None:  # fullgraph=True by default
                assert row["note"].startswith(f"skipped: {m.cls.fullgraph_reason}")
            else:
                assert row["ms_per_token"] > 0 and row["kv_cache_gib"] > 0, row["note"]
                assert sum(row["backends"].values()) == 2  # the eager stats step: 2 layers
                # every option as it ran (defaults included), so the row stays readable after a default changes
                built = m.cls(**({"page_size": 16, "a": 4} if m.name == "blasst" else {}))
                assert row["options"] == {o.name: getattr(built, o.name) for o in option_specs(m.cls)}
        for base in ("dense (attnpatch dispatch → SDPA)", "triton all pages"):
            assert rows[(mode, base)]["ms_per_token"] > 0 and rows[(mode, base)]["speedup_vs_best_dense"] > 0
        assert rows[(mode, "triton all pages")]["options"] == {"page_size": 16}
    assert rows[("compiled", "triton all pages")]["compile_s"] > 0
    assert "| 64 | 2 | compiled | triton all pages |" in (tmp_path / "hf_decode.md").read_text()
    assert hf_decode.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "64", "--batches", "1",
                           "--modes", "eager", "--methods", "blasst", "--baselines", "none", "--budget-s", "0",
                           "--out", str(tmp_path / "b")]) == 0
    row = json.loads((tmp_path / "b" / "hf_decode.json").read_text())["rows"][0]
    assert row["note"].startswith("skipped: time budget")
    assert hf_decode.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "64", "--batches", "1",
                           "--modes", "eager", "--methods", "quest", "--decode-options", "quest:page_size=16,budget=48",
                           "--baselines", "dense", "--steps", "2", "--repeats", "1", "--profile", "--host-profile",
                           "--out", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "hf_decode.json").read_text())["rows"]
    for row in rows:  # --profile: where each row's step time goes, largest first
        top = row["top_kernels"]
        assert top and all(k["ms_per_step"] > 0 and k["calls_per_step"] > 0 for k in top)
        assert [k["ms_per_step"] for k in top] == sorted((k["ms_per_step"] for k in top), reverse=True)
        assert row["kernel_ms_per_step"] >= sum(k["ms_per_step"] for k in top) * 0.999  # all kernels, not the top
        assert row["kernels_per_step"] >= sum(k["calls_per_step"] for k in top) - 1e-9
    assert "Top GPU kernels per step" in (tmp_path / "c" / "hf_decode.md").read_text()
    assert "kernels per step" in (tmp_path / "c" / "hf_decode.md").read_text()
    for row in rows:  # --host-profile: the Python functions with the most own time per step, largest first
        host = row["host_functions"]
        assert host and row["host_ms_per_step"] > 0
        assert [f["own_ms_per_step"] for f in host] == sorted((f["own_ms_per_step"] for f in host), reverse=True)
        assert all(f["cum_ms_per_step"] >= f["own_ms_per_step"] - 1e-9 for f in host)
    assert "Host time per eager or generate step" in (tmp_path / "c" / "hf_decode.md").read_text()
    with pytest.raises(SystemExit):
        hf_decode.main(["--device", "cpu", "--tiny", "--methods", "nope", "--out", str(tmp_path)])


def test_hf_decode_rows_of_methods_that_offload_or_read_in_chunks(tmp_path):
    """`retrieval`'s KV column counts what stays in the cache after its offload and, apart, what went to CPU
    memory; `infiniretri` decodes over the tokens its reading keeps (budget + chunk), eager and compiled."""
    from attnpatch.bench import hf_decode

    assert hf_decode.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "96", "--batches", "2",
                           "--modes", "eager,compiled", "--compile-backend", "eager", "--baselines", "none",
                           "--methods", "retrieval,infiniretri", "--steps", "2", "--repeats", "1", "--warmup", "0",
                           "--decode-options", "retrieval:n_sink=4,window=8,top_k=16",
                           "infiniretri:budget=16,chunk_size=16", "--out", str(tmp_path)]) == 0
    rows = {(r["mode"], r["name"].split(":")[0]): r
            for r in json.loads((tmp_path / "hf_decode.json").read_text())["rows"]}
    offload = rows[("eager", "retrieval")]
    assert 0 < offload["kv_cache_gib"] < offload["kv_cpu_gib"]  # 12 of ~100 tokens stay in the cache
    for mode in ("eager", "compiled"):
        row = rows[(mode, "infiniretri")]
        assert row["ms_per_token"] > 0 and row["note"] == "reads 96 tokens; its decode steps' cache holds 32"
    assert "(+" in (tmp_path / "hf_decode.md").read_text()  # the CPU part of the KV column


def test_hf_decode_times_whole_periods_of_a_periodic_method(tmp_path):
    """A `recycled` step refreshes every `stride` steps: runs shorter than a stride would hold a refresh or not,
    and their median would miss it. Its runs are `--steps` rounded up to whole strides (said in the row);
    a method whose steps cost alike keeps `--steps`."""
    from attnpatch.bench import hf_decode
    from attnpatch.registry import method_infos

    for m in method_infos("decode"):
        assert m.cls().period >= 1
    assert hf_decode.decode_period("recycled:stride=5") == 5 and hf_decode.decode_period("quest") == 1
    assert hf_decode.decode_period(None) == 1
    assert hf_decode.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "64", "--batches", "1",
                           "--modes", "eager", "--baselines", "dense", "--methods", "recycled,quest",
                           "--decode-options", "recycled:budget=48,page_size=16,stride=3",
                           "quest:budget=48,page_size=16", "--steps", "2", "--repeats", "2", "--warmup", "0",
                           "--out", str(tmp_path)]) == 0
    rows = {r["name"].split(":")[0]: r for r in json.loads((tmp_path / "hf_decode.json").read_text())["rows"]}
    assert rows["recycled"]["steps_per_run"] == 3 and "runs of 3 steps" in rows["recycled"]["note"]
    assert rows["quest"]["steps_per_run"] == 2 and rows["quest"]["note"] == ""
    assert rows["dense (attnpatch dispatch → SDPA)"]["steps_per_run"] == 2


def test_hf_decode_generate_mode_times_the_users_path(tmp_path):
    """Mode `generate` decodes with `model.generate` from the filled static cache: the same greedy tokens as the
    step loop (dense; quest reads its pages alike), a time per token from every pair of calls, `recycled` over
    whole strides; a method whose cache offloads at its first step (retrieval) is skipped with the reason."""
    import statistics

    from transformers.cache_utils import StaticCache

    import attnpatch
    from attnpatch.bench import hf_decode

    model = hf_decode.build_model(True, torch.device("cpu"), torch.float32, layers=2)
    for spec in (None, "quest:budget=48,page_size=16"):
        patch = attnpatch.patch_model(model, decode=spec) if spec else None
        try:
            cache = StaticCache(config=model.config, max_cache_len=80)
            token = hf_decode.fill_cache(model, cache, 64, 2, seed=1)
            _, generated = hf_decode._generator(model, cache, token, 64, None)(5)
            hf_decode.rewind(cache, 64)
            tok, steps = token, []
            with torch.no_grad():
                for _ in range(5):
                    tok = model(input_ids=tok, use_cache=True,
                                **{hf_decode.cache_kwarg(model): cache}).logits[:, -1:].argmax(-1)
                    steps.append(tok)
            assert torch.equal(generated, torch.cat(steps, 1)), spec
        finally:
            if patch is not None:
                patch.unpatch()
    assert hf_decode.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "64", "--batches", "2",
                           "--modes", "generate", "--baselines", "dense", "--methods", "recycled,retrieval",
                           "--decode-options", "recycled:budget=48,page_size=16,stride=3",
                           "retrieval:n_sink=4,window=8,top_k=16", "--steps", "4", "--repeats", "2", "--warmup", "0",
                           "--profile", "--host-profile", "--out", str(tmp_path)]) == 0
    rows = {r["name"].split(":")[0]: r for r in json.loads((tmp_path / "hf_decode.json").read_text())["rows"]}
    for row in (rows["recycled"], rows["dense (attnpatch dispatch → SDPA)"]):  # the profiles run one generate call
        assert row["top_kernels"] and row["host_functions"] and row["host_ms_per_step"] > 0
    for name in ("dense (attnpatch dispatch → SDPA)", "recycled"):
        row = rows[name]
        assert row["mode"] == "generate" and len(row["times_ms"]) == 2, row["note"]
        assert row["ms_per_token"] == statistics.median(row["times_ms"]) and row["compile_s"] is not None
        steps = row["steps_per_run"]  # each pair's two calls, in ms, give its time per token
        assert [(long - short) / steps for long, short in row["generate_calls_ms"]] == row["times_ms"]
    assert rows["recycled"]["steps_per_run"] == 6
    assert rows["retrieval"]["note"].startswith("skipped: its cache moved the prompt's K/V to CPU memory")


def test_hf_decode_options_give_a_row_per_setting():
    from attnpatch.bench import hf_decode

    options = hf_decode.parse_decode_options(["quest:budget=4096", "quest:budget=8192,dense_layers=0"])
    assert options == {"quest": ["budget=4096", "budget=8192,dense_layers=0"]}
    sparse = [c.name for c in hf_decode.decode_configs(["quest", "recycled"], options) if c.kind == "sparse"]
    assert sparse == ["quest:budget=4096", "quest:budget=8192,dense_layers=0", "recycled"]
    both = hf_decode.parse_decode_options(["retrieval", "retrieval:index=key_ivf"])  # a bare name: the defaults
    assert [c.name for c in hf_decode.decode_configs(["retrieval"], both) if c.kind == "sparse"] == \
        ["retrieval", "retrieval:index=key_ivf"]
    with pytest.raises(ValueError, match="name:key=value"):
        hf_decode.parse_decode_options(["quest:"])


def test_long_read_tiny_on_cpu(tmp_path):
    """The long-read benchmark times a dense prefill and InfiniRetri's chunked reading of the same input and
    reports what each leaves in the cache (every token; budget + the last chunk)."""
    from attnpatch.bench import long_read

    assert long_read.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "300", "--options", "budget=32",
                           "chunk_size=64", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    rows = {r["kind"]: r for r in json.loads((tmp_path / "long_read.json").read_text())["rows"]}
    assert rows["dense"]["cache_tokens"] == 300 and rows["dense"]["ms"] > 0
    assert rows["infiniretri"]["cache_tokens"] == 32 + 300 - 256 - 1 and rows["infiniretri"]["note"] == "4 compressions"
    assert rows["infiniretri"]["speedup_vs_best_dense"] > 0
    with pytest.raises(SystemExit):
        long_read.main(["--device", "cpu", "--tiny", "--options", "budget", "--out", str(tmp_path)])


def test_hf_decode_timed_runs_pause_the_garbage_collector():
    """A timed run collects first and pauses Python's garbage collector, then restores it (also on error)."""
    import gc

    from attnpatch.bench import hf_decode

    seen = []
    assert gc.isenabled()
    steps = hf_decode._time_steps(lambda tok: seen.append(gc.isenabled()) or tok, torch.zeros(1), 3, 2,
                                  torch.device("cpu"))
    assert len(steps) == 2 and seen == [False] * 6 and gc.isenabled()
    with pytest.raises(RuntimeError), hf_decode._no_gc():
        raise RuntimeError("a failing row")
    assert gc.isenabled()


def test_hf_decode_deferred_stop_check_gives_the_synchronous_tokens(monkeypatch, tmp_path):
    """Mode generate-deferred runs `generate` under transformers' own DeferredStopCheck (the stop flag read a step
    late): the same greedy tokens as the synchronous check, the check really used, transformers' class restored
    after. CPU ops run in order, so a no-op event stands in for the device event the check records; without it
    the mode's CPU rows are skipped with the reason."""
    import transformers.generation.utils as generation
    from transformers.cache_utils import StaticCache

    import attnpatch
    from attnpatch.bench import hf_decode

    assert hf_decode.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "64", "--batches", "2",
                           "--modes", "generate-deferred", "--baselines", "dense", "--methods", "quest",
                           "--steps", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "hf_decode.json").read_text())["rows"]
    assert rows and all("records device events" in r["note"] for r in rows)

    class InOrderEvent:
        def __init__(self, device=None, blocking=False):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch, "Event", InOrderEvent)
    base = generation.DeferredStopCheck
    reads = []
    real_call = base.__call__
    monkeypatch.setattr(base, "__call__", lambda self, *a: reads.append(type(self).__name__) or real_call(self, *a))
    model = hf_decode.build_model(True, torch.device("cpu"), torch.float32, layers=2)
    with attnpatch.patch_model(model, decode="quest:budget=48,page_size=16"):
        cache = StaticCache(config=model.config, max_cache_len=80)
        token = hf_decode.fill_cache(model, cache, 64, 2, seed=1)
        sync = hf_decode._generator(model, cache, token, 64, None)(6)[1]
        assert not reads
        deferred = hf_decode._generator(model, cache, token, 64, None, deferred=True)(6)[1]
    assert torch.equal(deferred, sync) and reads and set(reads) == {"OnAnyDevice"}
    assert generation.DeferredStopCheck is base
    # the rows, with such events: timed deferred, the synchronous check timed on the same graphs, tokens compared
    assert hf_decode.main(["--device", "cpu", "--tiny", "--layers", "2", "--lengths", "64", "--batches", "2",
                           "--modes", "generate-deferred", "--baselines", "dense", "--methods", "quest",
                           "--decode-options", "quest:budget=48,page_size=16", "--steps", "2", "--repeats", "2",
                           "--warmup", "0", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "hf_decode.json").read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        assert row["mode"] == "generate-deferred" and len(row["times_ms"]) == len(row["sync_times_ms"]) == 2
        assert row["matches_sync_tokens"] is True and row["note"].endswith("ms a token, the same tokens"), row["note"]
