"""Backend "auto" runs a prefill dense where the method was measured slower than dense SDPA on the H200
(`PrefillMethod.fast_from`, `BackendPlan.speed_gate`); an explicit backend, or a CPU, runs the method."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnpatch.backends as backends
from attnpatch import patch_model
from attnpatch.backends import resolve_backend
from attnpatch.registry import get_method, method_infos
from attnpatch.testing import tiny_model

CUDA = torch.device("cuda")  # a device object only: nothing runs on it here
PREFILL = [info for info in method_infos("prefill") if not info.cls.is_dense]


@pytest.mark.parametrize("info", PREFILL, ids=lambda i: i.name)
def test_every_method_declares_where_it_was_measured_faster(info):
    fast_from = info.cls.fast_from
    assert fast_from is None or (isinstance(fast_from, int) and fast_from > 0), (
        f"{info.name}: set fast_from from an H200 measurement (None if slower than dense at every length)")


@pytest.mark.parametrize("info", PREFILL, ids=lambda i: i.name)
def test_no_method_runs_sparse_at_8k_under_auto_on_cuda(info):
    """Issue 10: no method slower than dense at 8K; none was measured faster there, so each falls back."""
    reason = resolve_backend("auto").speed_gate(info.name, info.cls.fast_from, 8192, CUDA)
    assert reason is not None and info.name in reason and "backend 'auto'" in reason


@pytest.mark.parametrize("info", PREFILL, ids=lambda i: i.name)
def test_explicit_backends_and_cpu_are_never_gated(info):
    for name in ("triton", "flash", "reference", "flex"):
        assert resolve_backend(name).speed_gate(info.name, info.cls.fast_from, 8192, CUDA) is None
    assert resolve_backend("auto").speed_gate(info.name, info.cls.fast_from, 8192, torch.device("cpu")) is None
    assert resolve_backend({"prefill": "triton"}).speed_gate(info.name, info.cls.fast_from, 8192, CUDA) is None


def test_the_gate_opens_at_the_measured_length():
    plan = resolve_backend("auto")
    assert plan.speed_gate("m", 32768, 32767, CUDA) is not None
    assert plan.speed_gate("m", 32768, 32768, CUDA) is None
    assert "every length measured" in plan.speed_gate("m", None, 1 << 20, CUDA)
    assert plan.speed_gate("m", 0, 16, CUDA) is None  # 0: no gate


def test_dispatch_runs_gated_prefills_dense_with_the_reason(monkeypatch):
    monkeypatch.setattr(backends, "GATED_DEVICES", ("cpu",))  # gate the CPU as if it were the H200
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, 96))
    with torch.no_grad():
        want = model(ids).logits
        with patch_model(model, "xattention", backend="auto") as patch:
            got = model(ids).logits
            reasons = patch.stats().dense_fallbacks
        assert any("backend 'auto'" in r and "32768" in r for r in reasons)
        torch.testing.assert_close(got, want)  # dense is what ran
        with patch_model(model, "xattention", backend="reference") as patch:
            model(ids)
            assert not any("backend 'auto'" in r for r in patch.stats().dense_fallbacks)


def test_patching_warns_when_a_method_always_runs_dense(monkeypatch):
    monkeypatch.setattr(backends, "GATED_DEVICES", ("cpu",))
    model = tiny_model("llama")
    always = next(i.name for i in PREFILL if i.cls.fast_from is None)
    with pytest.warns(UserWarning, match=f"{always} will run its prefill dense here"):
        patch_model(model, always).unpatch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(model, always, backend="triton").unpatch()
        patch_model(model, "xattention").unpatch()  # gated only below its measured length: no warning


@pytest.mark.parametrize("info", PREFILL, ids=lambda i: i.name)
def test_sparse_is_auto_without_the_gate(info):
    sparse, auto = resolve_backend("sparse"), resolve_backend("auto")
    assert sparse.speed_gate(info.name, info.cls.fast_from, 8192, CUDA) is None
    assert (sparse.prefill_order, sparse.decode_order, sparse.dense_backend) == \
        (auto.prefill_order, auto.decode_order, auto.dense_backend)


def test_evaluations_run_auto_ungated():
    from attnpatch.spec import PatchSpec

    assert PatchSpec.build("xattention").for_evaluation().backend == "sparse"
    assert PatchSpec.build("xattention", backend="triton").for_evaluation().backend == "triton"
    assert PatchSpec.build("xattention", backend={"decode": "reference"}).for_evaluation().backend == \
        {"decode": "reference", "prefill": "sparse"}
    assert PatchSpec.build("xattention", backend={"prefill": "flex"}).for_evaluation().backend == {"prefill": "flex"}


def test_the_suite_scores_the_method_where_auto_would_run_dense(monkeypatch):
    """Gemma-3 at 16K on the H100 scored dense under backend auto (flexprefill is gated below 32K):
    the suite's tasks now run the method (its density below 1) with the gate on."""
    from attnpatch.eval.suite import RunSpec, run_one
    from attnpatch.models import load, smollm2_dir
    from attnpatch.spec import PatchSpec

    monkeypatch.setattr(backends, "GATED_DEVICES", ("cpu",))
    model, tok = load("tiny:llama", device="cpu")
    spec = PatchSpec.build("a_shape:local_blocks=2")  # a fixed sink + local band: sparse at 512 keys
    assert spec.method in {i.name for i in PREFILL} and get_method("a_shape", "prefill").cls.fast_from > 512
    with patch_model(model, spec) as patch, torch.no_grad():
        model(torch.randint(3, 200, (1, 512)))
        assert patch.stats().density == 1.0  # what the suite measured before
    run = run_one(model, tok, RunSpec(spec, 512), ["perplexity"], 1, "tiny:llama", str(smollm2_dir()),
                  measure_fidelity=False)
    assert run["density"] < 1.0 and not any("backend 'auto'" in r for r in run["dense_fallbacks"])


def test_calibrations_accuracy_target_scores_the_method_ungated(monkeypatch):
    import attnpatch.calibrate.accuracy as accuracy
    from attnpatch.models import load
    from attnpatch.spec import PatchSpec

    seen = []
    real = accuracy.patch_model

    def spy(model, spec):
        seen.append(spec.backend)
        return real(model, spec)

    monkeypatch.setattr(accuracy, "patch_model", spy)
    model, tok = load("tiny:llama", device="cpu")
    accuracy.passkey_score(model, tok, PatchSpec.build("a_shape"), 256, 1)
    assert seen == ["sparse"]
