"""lm-eval integration: model `attnpatch` is registered, runs a local task offline on the patched model."""

import json

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from attnpatch.eval.lm_eval_plugin import AttnpatchLM, resolve_model_args  # noqa: E402
from attnpatch.models import smollm2_dir  # noqa: E402

TASK = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def test_registered_under_attnpatch():
    assert get_model("attnpatch") is AttnpatchLM


def test_model_args_name_the_embedded_checkpoint_by_path():
    argv = ["--model", "attnpatch", "--model_args", "pretrained=smollm2,method=a_shape", "--tasks", "x"]
    out = resolve_model_args(argv)
    assert out[3] == f"pretrained={smollm2_dir()},method=a_shape" and out[:3] == argv[:3] and out[4:] == argv[4:]


def test_local_task_runs_on_the_patched_model(tmp_path):
    sentence = "It is a truth universally acknowledged that a single man in possession of a good fortune"
    words = sentence.split(" ") * 40
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(words[i:i + 300])}) for i in (0, 7)))
    (tmp_path / "tiny_ppl.yaml").write_text(TASK.format(data=data))
    results = {}
    for method, opts in (("dense", ""), ("a_shape", ",block_size=32,local_blocks=2")):
        out = simple_evaluate(model="attnpatch", model_args=f"pretrained=smollm2,method={method},dtype=float32{opts}",
                              tasks=["tiny_ppl"], device="cpu", limit=2,
                              task_manager=TaskManager(include_path=str(tmp_path)))
        results[method] = out["results"]["tiny_ppl"]["word_perplexity,none"]
    assert 1.0 < results["dense"] < 100.0
    assert results["a_shape"] != results["dense"]  # the patch is really in the loop


def test_essay_haystack_is_served_offline():
    from lm_eval.tasks.ruler import prepare_niah

    from attnpatch.eval.haystack import offline_essays, split_sentences

    original = prepare_niah.datasets.load_dataset
    with offline_essays():
        words = prepare_niah.get_haystack(type_haystack="essay")
        assert prepare_niah.sent_tokenize("One. Two? Three") == ["One.", "Two?", "Three"]
    assert len(words) > 100_000 and prepare_niah.datasets.load_dataset is original
    assert split_sentences("a. b") == ["a.", "b"]


def test_cli_hands_every_argument_to_lm_eval(monkeypatch):
    """`attnpatch lm-eval --model ...`: arguments that start with `--` reach lm-eval unchanged
    (argparse's REMAINDER would reject a leading option)."""
    import attnpatch.eval.lm_eval_plugin as plugin
    from attnpatch.cli import main

    seen = []
    monkeypatch.setattr(plugin, "main", lambda argv: seen.append(argv) or 0)
    argv = ["--model", "attnpatch", "--model_args", "method=a_shape", "--tasks", "niah_single_1", "--limit", "2"]
    with pytest.raises(SystemExit) as done:
        main(["lm-eval", *argv])
    assert done.value.code == 0 and seen == [argv]
