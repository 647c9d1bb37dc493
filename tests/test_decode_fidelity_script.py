"""The decode-fidelity harness (bench/scripts/decode_fidelity.py) restores one dense prefill into each decode
method's cache: decoding from the restored cache must equal decoding after a real prefill, sliding-window
layers (Gemma 3) included; its prompt files round-trip and refuse another run's prompts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import cache_arg
from transformers import DynamicCache

from attnpatch import patch_model
from attnpatch.spec import PatchSpec
from attnpatch.testing import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "decode_fidelity.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("decode_fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _assert_decodes_like_a_real_prefill(harness, model, spec, ids, first, restored) -> None:
    """`restored` (tokens, logits of 6 greedy steps) equals decoding after a real prefill of `ids` under the
    patch the caller holds."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **cache_arg(model, cache), use_cache=True)
    real = harness.decode_run(model, spec, cache, first, 6, None)
    assert restored[0] == real[0]
    torch.testing.assert_close(restored[1], real[1])


@pytest.mark.parametrize("decode", ["dense", "quest:budget=48,page_size=16,dense_layers=0"])
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_a_restored_prefill_decodes_like_a_real_one(harness, family, decode):
    model = tiny_model(family, sliding_window=16)  # gemma3: a sliding layer, then a full one
    ids = torch.randint(3, 200, (1, 90), generator=torch.Generator().manual_seed(0))
    spec = PatchSpec.build("dense", decode)
    keys, values, first = harness.prefill(model, ids, None)
    with patch_model(model, spec):
        restored = harness.decode_run(model, spec, harness.prefilled_cache(model, spec, keys, values, 90),
                                      first, 6, None)
        _assert_decodes_like_a_real_prefill(harness, model, spec, ids, first, restored)


def test_prompt_files_round_trip_and_refuse_other_runs(harness, tmp_path):
    items = [harness.Prompt("text one", ("42",), None, None, {"outputs": ["42"], "max_length": 1024})]
    path = tmp_path / "p.json"
    harness.export_prompts(path, "niah_single_1", "gemma3-270m", 1024, 0, items)
    back = harness.imported_prompts(path, "niah_single_1", "gemma3-270m", 1024, 0, 1)
    assert [(p.text, p.targets, p.doc, p.is_correct) for p in back] == [("text one", ("42",), items[0].doc, None)]
    with pytest.raises(SystemExit, match="not"):
        harness.imported_prompts(path, "niah_single_1", "smollm2", 1024, 0, 1)
    with pytest.raises(SystemExit, match="--limit asks for 2"):
        harness.imported_prompts(path, "niah_single_1", "gemma3-270m", 1024, 0, 2)
    assert harness.accuracy([{"correct": True}, {"correct": None}]) is None
    assert harness.accuracy([{"correct": True}, {"correct": False}]) == 0.5


def test_a_method_that_reads_prefill_queries_gets_an_observed_prefill(harness):
    """`retrieval` with the query-IVF index builds it from the prefill's queries: the harness runs the prompt
    through the patched model for it (restoring the K/V alone, it raised that no queries were observed), and
    decodes as a real patched prefill does."""
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, 120), generator=torch.Generator().manual_seed(1))
    spec = PatchSpec.build("dense", "retrieval:n_sink=4,window=16,top_k=24,index=query_ivf,cluster_size=8,n_probe=4")
    keys, values, first = harness.prefill(model, ids, None)
    with patch_model(model, spec):
        with pytest.raises(RuntimeError, match="prefill queries"):
            harness.decode_run(model, spec, harness.prefilled_cache(model, spec, keys, values, 120), first, 2, None)
        restored = harness.decode_run(model, spec, harness.prefilled_cache(model, spec, keys, values, 120, ids),
                                      first, 6, None)
        _assert_decodes_like_a_real_prefill(harness, model, spec, ids, first, restored)


def test_a_method_without_read_counts_is_tabled_with_a_dash(harness, tmp_path):
    """`retrieval` computes its steps itself and reports no decode density: the table says so, not a crash."""
    runs = [{"agreement": 1.0, "kl": 0.0, "recall": 1.0, "decode_density": None, "correct": True}]
    row = {"spec": "retrieval", "length": 64, "accuracy": 1.0, "agreement": 1.0, "kl": 0.0, "recall": 1.0,
           "decode_density": None, "runs": runs}
    meta = {"task": "passkey", "limit": 1, "model": "smollm2", "device": "cpu", "dtype": "float32", "command": "c",
            "answer_tokens": 4, "forced_tokens": 4}
    harness.write(tmp_path / "run", meta, [row])
    assert "| 64 | `retrieval` | 1.00 | – | 1.000 | 0.0000 | 1.0000 | – |" in (tmp_path / "run.md").read_text()


def test_each_row_is_paired_with_dense_on_the_same_prompts(harness, tmp_path):
    """A scored row lists the prompts it loses / wins against dense (by sample) with McNemar's exact p, in its
    JSON and its table; dense itself and unscored rows get none."""
    import json

    def row(spec, correct):
        runs = [{"sample": i, "agreement": 1.0, "kl": 0.0, "recall": 1.0, "decode_density": 0.1, "correct": c}
                for i, c in enumerate(correct)]
        scored = None if None in correct else sum(correct) / len(correct)
        return {"spec": spec, "length": 64, "accuracy": scored, "agreement": 1.0, "kl": 0.0, "recall": 1.0,
                "decode_density": 0.1, "runs": runs}

    meta = {"task": "niah_single_1", "limit": 6, "model": "smollm2", "device": "cpu", "dtype": "float32",
            "command": "c", "answer_tokens": 4, "forced_tokens": 4}
    rows = [row("dense", [True, True, True, True, True, False]),
            row("quest", [False, False, False, False, True, False]),
            row("recycled", [True, True, True, True, True, True]), row("other", [None] * 6)]
    harness.write(tmp_path / "run", meta, rows)
    by_spec = {r["spec"]: r for r in json.loads((tmp_path / "run.json").read_text())["results"]}
    assert by_spec["quest"]["against_dense"] == {"lost": [0, 1, 2, 3], "won": [], "p": 0.125}
    assert by_spec["recycled"]["against_dense"] == {"lost": [], "won": [5], "p": 1.0}
    assert "against_dense" not in by_spec["dense"] and "against_dense" not in by_spec["other"]
    table = (tmp_path / "run.md").read_text()
    assert "| 64 | `quest` | 0.17 | lost 4 / won 0 (p 0.12) |" in table
    assert "| 64 | `dense` | 0.83 | – |" in table


def test_a_stopped_run_is_rebuilt_from_its_lines(harness, tmp_path):
    """`--from-log`: the prompts every spec finished, with their printed figures and the prompt file's targets;
    a prompt only some specs reached is left out; answers stay unscored until `--rescore`."""
    import argparse
    import json

    lines = [
        "L=16384 sample 0 dense: ': 123.\\nThe' correct=None agree=1.000 kl=0.0000 recall=1.0000 density=0.194",
        "L=16384 sample 0 quest:budget=1024: \": it's 124\" correct=None agree=0.938 kl=0.0019 "
        "recall=0.9623 density=0.038",
        "L=16384 sample 1 dense: ': 77' correct=None agree=1.000 kl=0.0000 recall=1.0000 density=0.200",
        "some other output",
        "L=16384 sample 1 quest:budget=1024: ': 77' correct=None agree=1.000 kl=0.0010 recall=0.9000 density=0.040",
        "L=16384 sample 2 dense: ': 5' correct=None agree=1.000 kl=0.0000 recall=1.0000 density=0.194",
    ]
    log = tmp_path / "run.log"
    log.write_text("\n".join(lines) + "\n")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"prompts": [{"targets": ["123"]}, {"targets": ["77"]}, {"targets": ["5"]}]}))
    args = argparse.Namespace(model="gemma3-270m", task="niah_single_1", seed=0, answer_tokens=16, forced_tokens=16,
                              out=str(tmp_path / "out"))
    path = harness.runs_from_log(log, args, prompts)
    data = json.loads(path.read_text())
    assert data["limit"] == 2
    rows = {r["spec"]: r for r in data["results"]}
    assert [r["answer"] for r in rows["quest:budget=1024"]["runs"]] == [": it's 124", ": 77"]
    assert [r["target"] for r in rows["dense"]["runs"]] == [["123"], ["77"]]
    assert rows["quest:budget=1024"]["kl"] == pytest.approx(0.00145) and rows["dense"]["accuracy"] is None
    assert "unscored" in path.with_suffix(".md").read_text()


@pytest.mark.parametrize("flag", ["--forced-tokens", "--answer-tokens"])
def test_zero_steps_are_refused_with_the_reason(harness, monkeypatch, capsys, flag):
    monkeypatch.setattr(sys, "argv", ["decode_fidelity.py", flag, "0"])
    with pytest.raises(SystemExit):
        harness.main()
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["dense", "recycled:budget=256", "quest:budget=256,dense_layers=0"])
def test_rows_record_every_option_as_it_ran(harness, name):
    """A row keeps each option as the method ran it — defaults and values derived from others (recycled's page
    size from its budget) included — so a result stays readable after a default changes."""
    from attnpatch.options import option_specs
    from attnpatch.registry import get_method

    spec = PatchSpec.build("dense", name)
    run = {"agreement": 1.0, "kl": 0.0, "recall": 1.0, "decode_density": 1.0, "correct": True, "seconds": 1.0}
    row = harness.spec_rows([spec], {name: [run]}, 4096)[0]
    method = get_method(spec.decode, "decode").build(dict(spec.decode_options))
    assert row["resolved_options"] == {o.name: getattr(method, o.name) for o in option_specs(type(method))}
    assert {k: row["resolved_options"][k] for k in spec.decode_options} == dict(spec.decode_options)
    if spec.decode == "recycled":  # 256 tokens hold fewer than 8 pages of 64: 32-token pages
        assert row["resolved_options"]["page_size"] == 32
