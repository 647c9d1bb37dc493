"""lm-eval integration: model `attnpatch` is registered, runs a local task offline on the patched model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from attnpatch.eval.lm_eval_plugin import AttnpatchLM, resolve_model_args, split_model_args  # noqa: E402
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
    from attnpatch.eval.haystack import offline_essays, ruler_module, split_sentences

    prepare_niah = ruler_module()

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
    monkeypatch.setattr(plugin, "main", lambda argv, essays=True: seen.append((argv, essays)) or 0)
    argv = ["--model", "attnpatch", "--model_args", "method=a_shape", "--tasks", "niah_single_1", "--limit", "2"]
    with pytest.raises(SystemExit) as done:
        main(["lm-eval", *argv])
    assert done.value.code == 0 and seen == [(argv, True)]
    for light in (["ls", "tasks"], ["run", "--help"], ["validate", "--tasks", "x"]):  # no essay haystack set-up
        with pytest.raises(SystemExit):
            main(["lm-eval", *light])
        assert seen[-1] == (light, False)


def test_model_args_split_into_the_patch_and_hflm_arguments(tmp_path):
    from attnpatch import Profile
    from attnpatch.testing import tiny_model

    profile = tmp_path / "p.json"
    Profile.for_model(tiny_model("llama"), name="p").save(profile)
    spec, rest = split_model_args({
        "method": "a_shape:local_blocks=4", "sink_blocks": 2, "decode": "streaming", "window": "256",
        "attn_backend": "reference", "profile": str(profile), "allow_other_weights": "true",
        "dtype": "float32", "batch_size": 1, "max_length": 4096,
    })
    assert (spec.method, spec.prefill_options) == ("a_shape", {"local_blocks": 4, "sink_blocks": 2})
    assert (spec.decode, spec.decode_options) == ("streaming", {"window": 256})
    assert spec.backend == "reference" and spec.profile.name == "p" and spec.allow_other_weights is True
    assert rest == {"dtype": "float32", "batch_size": 1, "max_length": 4096}
    both, _ = split_model_args({"method": "blasst", "decode": "blasst", "prefill.a": 64, "decode.a": "2"})
    assert both.prefill_options == {"a": 64.0} and both.decode_options == {"a": 2.0}
    with pytest.raises(ValueError, match="declared by both"):
        split_model_args({"method": "blasst", "decode": "blasst", "a": 64})
    with pytest.raises(ValueError,
                       match="'window' is an option of .*decode method 'streaming'.*, not of method='a_shape'"):
        split_model_args({"method": "a_shape", "window": 256})
    with pytest.raises(ValueError, match="available decode methods"):
        split_model_args({"decode": "bogus"})
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        split_model_args({"attn_backend": "fast"})


def test_plugin_patches_a_model_object_with_the_spec_from_model_args():
    from transformers import AutoTokenizer

    from attnpatch.testing import tiny_model

    lm = AttnpatchLM(pretrained=tiny_model("llama"), tokenizer=AutoTokenizer.from_pretrained(smollm2_dir()),
                     method="a_shape:block_size=16", local_blocks=2, decode="streaming", window=64,
                     attn_backend="reference", device="cpu", batch_size=1)
    assert lm.patch.active and lm.model.config._attn_implementation == "attnpatch"
    assert lm.spec.prefill_options == {"block_size": 16, "local_blocks": 2} and lm.spec.decode_options == {"window": 64}
    assert lm.spec.backend == "reference"


def test_ruler_module_imports_without_a_punkt_download():
    """lm-eval's RULER module calls nltk.download("punkt_tab") at import when punkt is missing; the
    essay haystack never needs punkt, so attnpatch imports the module with that call turned off."""
    code = ("import urllib.request\n"
            "def no_network(*a, **k):\n    raise AssertionError('network call')\n"
            "urllib.request.urlopen = no_network\n"
            "from attnpatch.eval.haystack import ruler_module\n"
            "import nltk\ndownload = nltk.download\n"
            "m = ruler_module()\n"
            "assert nltk.download is download and m.__name__.endswith('prepare_niah')\nprint('ok')")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "ok" in done.stdout, out
    assert "download" not in out.lower()
