"""The offline suite end to end (embedded checkpoint, 2 samples per task) and the report built from it."""

import json
from pathlib import Path

import pytest
import torch

from attnpatch import PatchSpec
from attnpatch.eval.report import load_runs, nominal, pareto, runs_table, write_report
from attnpatch.eval.suite import RunSpec, grid_specs

COMMITTED = Path(__file__).resolve().parents[1] / "bench" / "results" / "eval_smollm2_n20"


def test_pareto_by_hand():
    pts = [(1.0, 0.9), (0.5, 0.9), (0.3, 0.5), (0.4, 0.95), (0.2, 0.1)]
    assert pareto(pts) == [(0.2, 0.1), (0.3, 0.5), (0.4, 0.95)]
    assert pareto([(1.0, 18.0), (0.5, 19.0), (0.6, 20.0)], higher_is_better=False) == [(0.5, 19.0), (1.0, 18.0)]
    assert nominal(0.108) == 0.1 and nominal(0.023) == 0.02 and nominal(1.0) == 1.0


def test_report_from_result_files(tmp_path):
    pytest.importorskip("matplotlib")
    for method, dens, score in (("dense", 1.0, 1.0), ("a_shape", 0.4, 0.5)):
        run = {"model": "m", "method": method, "options": {}, "length": 1024, "limit": 2,
               "scores": {"passkey": score, "perplexity": 20 / score}, "density": dens, "skipped_fraction": None,
               "density_per_layer": [dens, dens], "device": "cpu", "dtype": "float32"}
        (tmp_path / f"{method}.json").write_text(json.dumps(run))
    runs = load_runs(tmp_path)
    table = runs_table(runs)
    assert table.splitlines()[2].startswith("| 1024 | dense | 1.000 |")
    assert "| 1024 | a_shape | 0.400 | - | - | 0.500 | 40.000 |" in table
    out = write_report(tmp_path, tmp_path / "report.md")
    assert out.read_text().count("| 1024 |") == 2 and (tmp_path / "report.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="no suite results"):
        load_runs(tmp_path / "nothing-here")
    runs[1] = {**runs[1], "device": "cuda:0", "dtype": "torch.bfloat16", "limit": 20}  # runs from two settings
    mixed = runs_table(runs)
    assert mixed.splitlines()[0].endswith("run on |") and "| cuda:0 bfloat16 ×20 |" in mixed
    assert "| cpu float32 ×2 |" in mixed


@pytest.mark.slow
def test_suite_runs_offline_on_the_embedded_checkpoint(tmp_path):
    pytest.importorskip("lm_eval")
    from attnpatch.eval.suite import run_grid

    files = run_grid("smollm2", ["a_shape"], ["passkey", "perplexity", "niah_single_1"], [1024], 1, tmp_path,
                     {"a_shape": {"local_blocks": 4}}, max_gen_toks=16)
    assert [f.name for f in files] == ["a_shape_local_blocks4_L1024.json"]
    result = json.loads(files[0].read_text())
    assert result["spec"]["method"] == "a_shape" and result["spec"]["prefill_options"] == {"local_blocks": 4}
    assert result["options"] == {"local_blocks": 4} and result["decode"] == "dense"
    assert result["backends"].get("prefill: reference") and "backend_declined" in result
    assert set(result["scores"]) == {"passkey", "perplexity", "niah_single_1"}
    assert 0 <= result["scores"]["passkey"] <= 1 and 0 <= result["scores"]["niah_single_1"] <= 1
    assert 5 < result["scores"]["perplexity"] < 100
    assert 0.3 < result["density"] < 0.8 and len(result["density_per_layer"]) == 30
    assert result["decode_density"] == 1.0  # dense decode reads every cached key
    assert 0 < result["fidelity"]["recall"] < 1 and result["fidelity"]["rel_error"] > 0
    with pytest.raises(ValueError, match="offline tasks: passkey, perplexity, niah_single_1"):
        run_grid("smollm2", ["dense"], ["ruler_qa_squad"], [1024], 1, tmp_path)
    with pytest.raises(ValueError, match="max_gen_toks must be a positive integer"):
        run_grid("smollm2", ["dense"], ["passkey"], [1024], 1, tmp_path, max_gen_toks=0)


def test_result_file_names_stay_stable():
    assert RunSpec(PatchSpec.build("a_shape"), 4096).name == "a_shape_L4096"
    assert RunSpec(PatchSpec.build("a_shape:local_blocks=4"), 4096).name == "a_shape_local_blocks4_L4096"
    assert RunSpec(PatchSpec.build("blasst", a=128), 8192).name == "blasst_a128_L8192"
    assert RunSpec(PatchSpec.build("blasst", a=0.5), 8192).name == "blasst_a0.5_L8192"
    spec = PatchSpec.build("a_shape:local_blocks=4", "streaming:window=256", backend="reference")
    assert RunSpec(spec, 2048).name == "a_shape_local_blocks4_dec-streaming_window256_on-reference_L2048"


def test_grid_specs_take_spec_strings_options_decode_and_backend():
    specs = grid_specs(["dense", "a_shape:local_blocks=4", PatchSpec.build("blasst", a=64)],
                       {"a_shape": {"sink_blocks": "2"}}, decode="streaming:window=256", backend="reference")
    assert [s.method for s in specs] == ["dense", "a_shape", "blasst"]
    assert specs[1].prefill_options == {"local_blocks": 4, "sink_blocks": 2}
    assert specs[0].decode_options == {"window": 256} and specs[0].backend == "reference"
    assert specs[2].decode == "dense" and specs[2].backend == "auto"  # a PatchSpec runs as it is
    with pytest.raises(ValueError, match=r"method\(s\) \['streaming'\] that the grid does not run"):
        grid_specs(["a_shape"], {"streaming": {"window": 4}})
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        grid_specs(["a_shape"], {"a_shape": {"bogus": 1}})
    with pytest.raises(ValueError, match="list of method specs"):
        grid_specs("a_shape")


def test_run_grid_checks_everything_before_loading_the_model(monkeypatch, tmp_path):
    import attnpatch.eval.suite as suite

    monkeypatch.setattr(suite, "load", lambda *a, **k: pytest.fail("model loaded before the checks"))
    with pytest.raises(ValueError, match="must be int >= 1"):
        suite.run_grid("smollm2", ["a_shape:local_blocks=0"], ["passkey"], [1024], 1, tmp_path)
    with pytest.raises(ValueError, match="more than once"):
        suite.run_grid("smollm2", ["a_shape", "a_shape"], ["passkey"], [1024], 1, tmp_path)
    with pytest.raises(ValueError, match="positive integers"):
        suite.run_grid("smollm2", ["a_shape"], ["passkey"], [0], 1, tmp_path)


def test_report_reads_the_committed_results(tmp_path):
    pytest.importorskip("matplotlib")
    runs = load_runs(COMMITTED)
    assert len(runs) == 6 and all("spec" not in r for r in runs)  # written before specs were recorded
    table = runs_table(runs)
    assert "| 4096 | a_shape |" in table and "| 8192 | blasst |" in table
    out = write_report(COMMITTED, tmp_path / "report.md")
    assert out.read_text().count("| 4096 |") == 3


def test_report_labels_decode_and_backend(tmp_path):
    spec = PatchSpec.build("a_shape:local_blocks=4", "streaming:window=256", backend="reference")
    run = {"model": "m", "method": "a_shape", "options": {"local_blocks": 4}, "decode": "streaming",
           "decode_options": {"window": 256}, "spec": spec.to_dict(), "length": 1024, "limit": 1,
           "scores": {"passkey": 1.0}, "density": 0.5, "skipped_fraction": None, "device": "cpu", "dtype": "float32"}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert "| 1024 | a_shape(local_blocks=4)+streaming(window=256)@reference |" in runs_table(load_runs(tmp_path))


def test_infiniretri_passkey_reads_chunk_by_chunk_and_other_tasks_say_they_do_not(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import attnpatch.methods.decode.infiniretri as infiniretri
    from attnpatch.eval.suite import _notes, run_grid

    calls = []
    real = infiniretri.generate_long

    def counted(*args, **kwargs):
        calls.append((args[1].shape, args[2].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(infiniretri, "generate_long", counted)
    files = run_grid("tiny:llama", ["dense"], ["passkey"], [256], 2, tmp_path,
                     decode="infiniretri:budget=64,chunk_size=64")
    result = json.loads(files[0].read_text())
    # each prompt's context read in chunks, scored with the question apart
    assert len(calls) == 2 and all(context[1] > 3 * 64 and 5 < question[1] < 20 for context, question in calls)
    assert 0 <= result["scores"]["passkey"] <= 1 and result["notes"] == []
    files = run_grid("tiny:llama", ["dense"], ["passkey"], [256], 1, tmp_path / "b")
    assert json.loads(files[0].read_text())["notes"] == [] and len(calls) == 2
    run = SimpleNamespace(spec=SimpleNamespace(decode="infiniretri"))
    assert "perplexity" in _notes(run, ["passkey", "perplexity"])[0]


def test_a_stopped_run_keeps_its_finished_tasks_and_a_fidelity_oom_keeps_the_scores(tmp_path, monkeypatch):
    import attnpatch.eval.suite as suite

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what a deadline's kill looks like from inside: the run ends mid-task

    monkeypatch.setattr(suite, "window_perplexity", stopped)
    with pytest.raises(KeyboardInterrupt):
        suite.run_grid("tiny:llama", ["a_shape:block_size=32"], ["passkey", "perplexity"], [256], 1, tmp_path)
    partial = json.loads((tmp_path / "a_shape_block_size32_L256.json").read_text())
    assert partial["complete"] is False and set(partial["scores"]) == {"passkey"}
    assert set(partial["task_seconds"]) == {"passkey"} and partial["fidelity"] is None
    assert "(stopped before its end)" in runs_table(load_runs(tmp_path))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    monkeypatch.undo()
    monkeypatch.setattr(suite, "_fidelity", out_of_memory)
    files = suite.run_grid("tiny:llama", ["a_shape:block_size=32"], ["passkey"], [256], 1, tmp_path / "b")
    done = json.loads(files[0].read_text())
    assert done["complete"] is True and set(done["scores"]) == {"passkey"}
    assert done["fidelity"] == {"error": "out of memory: CUDA out of memory. Tried to allocate 9 GiB"}
    assert "| 256 | a_shape(block_size=32) | " in runs_table(load_runs(tmp_path / "b"))
