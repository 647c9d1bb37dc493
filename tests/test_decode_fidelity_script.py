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
        restored = harness.decode_run(model, spec, harness.prefilled_cache(model, spec, keys, values, 90), first, 6, None)
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
    assert "| 64 | `retrieval` | 1.00 | 1.000 | 0.0000 | 1.0000 | – |" in (tmp_path / "run.md").read_text()
