"""The offline suite end to end (embedded checkpoint, 2 samples per task) and the report built from it."""

import json

import pytest

from attnpatch.eval.report import load_runs, nominal, pareto, runs_table, write_report


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

    files = run_grid("smollm2", ["a_shape"], ["passkey", "perplexity", "niah_single_1"], [1024], 2, tmp_path,
                     {"a_shape": {"local_blocks": 4}})
    result = json.loads(files[0].read_text())
    assert set(result["scores"]) == {"passkey", "perplexity", "niah_single_1"}
    assert 0 <= result["scores"]["passkey"] <= 1 and 0 <= result["scores"]["niah_single_1"] <= 1
    assert 5 < result["scores"]["perplexity"] < 100
    assert 0.3 < result["density"] < 0.8 and len(result["density_per_layer"]) == 30
    assert 0 < result["fidelity"]["recall"] < 1 and result["fidelity"]["rel_error"] > 0
    with pytest.raises(ValueError, match="offline tasks: passkey, perplexity, niah_single_1"):
        run_grid("smollm2", ["dense"], ["ruler_qa_squad"], [1024], 1, tmp_path)
