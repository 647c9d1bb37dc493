"""HeSS: attention-output gradients, per-head sensitivity-weighted errors, budget redistribution, the
profiles it writes and the errors it raises (tiny models, every calibratable method of the registry)."""

import itertools
import json

import pytest
import torch
from method_cases import CharTokenizer, calibration_options

from attnpatch import patch_model
from attnpatch.backends import BACKENDS
from attnpatch.calibrate import hess, hess_measure
from attnpatch.calibrate.hess_alloc import allocate
from attnpatch.calibrate.hess_grad import record_with_grads
from attnpatch.calibrate.hess_score import layer_curves
from attnpatch.calibrate.run import calibratable_methods
from attnpatch.calibrate.search import dense_outputs, evaluate
from attnpatch.methods.base import DenseFallback, PrefillContext
from attnpatch.profile import Profile
from attnpatch.registry import get_method
from attnpatch.testing import tiny_model

_options = calibration_options
_Tok = CharTokenizer


@pytest.fixture(scope="module")
def recorded():
    model = tiny_model("llama")
    torch.manual_seed(0)
    prompts = [torch.randint(3, 256, (1, 192)) for _ in range(2)]
    layers, grads, losses = record_with_grads(model, prompts)
    return model, prompts, layers, grads, losses


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"{i} the quick brown fox jumps over the lazy dog " * 8})
                              for i in range(2)))
    return str(path)


def test_gradients_are_the_loss_gradient_per_head(recorded):
    """A step along the recorded gradient of one layer's attention output changes the LM loss by ε‖g‖."""
    model, prompts, layers, grads, losses = recorded
    assert list(grads) == list(layers) == [0, 1] and grads[1][0].shape == layers[1].query[0].shape
    ids = prompts[0]
    with torch.no_grad():
        assert model(ids, labels=ids).loss.item() == pytest.approx(losses[0], rel=1e-5)
    g = grads[0][0]  # [1, Hq, L, D]
    eps = 1e-2 / float(g.norm())
    step = (eps * g).transpose(1, 2).reshape(1, ids.shape[1], -1)
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: (a[0] + step,))
    try:
        with torch.no_grad():
            moved = model(ids, labels=ids).loss.item()
    finally:
        hook.remove()
    assert moved - losses[0] == pytest.approx(eps * float((g * g).sum()), rel=0.05)


def test_checkpointing_gives_the_same_gradients(recorded):
    model, prompts, _, grads, _ = recorded
    _, again, _ = record_with_grads(model, prompts[:1], checkpointing=True)
    for i in grads:
        torch.testing.assert_close(again[i][0], grads[i][0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", calibratable_methods())
def test_sensitivity_is_nonnegative_zero_at_full_density_and_matches_the_executor(recorded, method):
    _, _, layers, grads, _ = recorded
    info = get_method(method, "prefill")
    knob = info.cls.knob
    layer = layers[1]
    sparse = {**_options(method), knob.option: float(knob.value(torch.tensor([0.3])))}
    full = {**_options(method), **info.cls.full_density}
    curves = layer_curves(info, layer, grads[1], [full, sparse])
    for term in (curves.output_term, curves.mass_term):
        assert bool((term >= 0).all())
        assert float(term[0].max()) <= 1e-14  # nothing dropped: no error, no lost mass
    assert torch.allclose(curves.density[0], torch.ones_like(curves.density[0]))
    assert float(curves.recall[0].min()) == pytest.approx(1.0, abs=1e-5)
    # the error, density and output term are those of the method's real executor
    err, den = evaluate(info, sparse, layer, dense_outputs(layer))
    torch.testing.assert_close(curves.rel_error[1], err, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(curves.density[1], den, rtol=1e-6, atol=1e-9)
    method_obj = info.build(sparse, layer.query[0].shape[1])
    direct = torch.zeros_like(curves.output_term[1])
    error_sq = torch.zeros_like(direct)
    grad_sq = torch.cat([(g.float() ** 2).transpose(0, 1).reshape(g.shape[1], -1) for g in grads[1]], 1).mean(1)
    for q, k, v, bounds, g, ref in zip(layer.query, layer.key, layer.value, layer.bounds, grads[1],
                                       dense_outputs(layer), strict=True):
        sel = method_obj.select(q, k, PrefillContext(1, layer.scale, bounds, layer.window))
        if isinstance(sel, DenseFallback):
            continue
        out = BACKENDS["reference"].prefill(q, k, v, sel, scale=layer.scale, bounds=bounds).float()
        direct += 0.5 * ((g * (out - ref)).sum(-1) ** 2).sum((0, 2)).double()
        error_sq += ((out - ref) ** 2).sum((0, 2, 3)).double()
    torch.testing.assert_close(curves.output_term[1], direct / len(layer.query), rtol=2e-3, atol=1e-16)
    torch.testing.assert_close(curves.error_sq[1], error_sq / len(layer.query), rtol=2e-3, atol=1e-12)
    torch.testing.assert_close(curves.grad_sq, grad_sq.double(), rtol=1e-4, atol=0)


def test_diagonal_form_is_nonnegative_and_zero_at_full_density(recorded):
    _, _, layers, grads, _ = recorded
    info = get_method("xattention", "prefill")
    settings = [{**_options("xattention"), "threshold": t} for t in (1.0, 0.6)]
    curves = layer_curves(info, layers[0], grads[0], settings, form="diagonal")
    assert float(curves.output_term[0].max()) <= 1e-14 and float(curves.mass_term[0].max()) <= 1e-14
    assert bool((curves.output_term[1] > 0).all()) and bool((curves.mass_term[1] > 0).all())
    with pytest.raises(ValueError, match="form must be one of fisher, diagonal"):
        layer_curves(info, layers[0], grads[0], settings, form="full")


def test_allocation_hits_the_target_and_favours_sensitive_heads():
    d = torch.linspace(0.1, 1.0, 10).expand(6, 10).clone()
    weight = torch.tensor([1.0, 1.0, 10.0, 1.0, 0.1, 1.0]).view(6, 1)
    cost = weight * (1 - d) ** 2
    for target in (0.2, 0.35, 0.5, 0.8):
        pick = allocate(d, cost, target)
        got = d[torch.arange(6), pick]
        assert abs(float(got.mean()) - target) <= 0.1 / 6 + 1e-9  # within one head's grid step
        assert got[2] == got.max() and got[4] == got.min() and got[2] > got[4] or target == 0.2
    # on convex curves the greedy is exact: no choice within the same density costs less
    d3, c3 = d[:3, ::3], cost[:3, ::3]
    pick = allocate(d3, c3, 0.5)
    best = float(c3[torch.arange(3), pick].sum())
    reached = float(d3[torch.arange(3), pick].mean())
    for combo in itertools.product(range(4), repeat=3):
        idx = torch.tensor(combo)
        if float(d3[torch.arange(3), idx].mean()) <= reached + 1e-12:
            assert float(c3[torch.arange(3), idx].sum()) >= best - 1e-12
    with pytest.raises(ValueError, match="outside what the knob reaches"):
        allocate(d, cost, 0.05)
    with pytest.raises(ValueError, match="same non-empty"):
        allocate(d, cost[:, :3], 0.5)


@pytest.fixture(scope="module")
def measured():
    return tiny_model("llama")


def _reachable(cal) -> tuple[float, float]:
    dens = torch.cat([c.density.T for c in cal.curves.values()])
    return float(dens.min(1).values.mean()), float(dens.max(1).values.mean())


@pytest.mark.parametrize("method", calibratable_methods())
def test_hess_and_uniform_profiles_meet_the_density_and_patch(measured, data, method, tmp_path):
    model = measured
    cal = hess_measure(model, _Tok(), method, data=data, samples=2, lengths=(192,), options=_options(method),
                       grid=5, progress=False)
    lo, hi = _reachable(cal)
    if hi - lo < 0.05:
        pytest.skip(f"{method} keeps (almost) every key of 192-token prompts at every knob value")
    target = lo + 0.5 * (hi - lo)
    profile = cal.redistribute(target)
    hq = model.config.num_attention_heads
    assert profile.meta["mode"] == "hess" and profile.meta["method"] == method
    assert abs(profile.meta["achieved"]["density"] - target) <= 1.0 / (2 * hq)  # one head's step at most
    assert all(len(profile.layers[i]["prefill_options"][cal.knob.option]) == hq for i in profile.layers)
    uniform = cal.uniform(target, steps=8)
    assert uniform.meta["mode"] == "uniform"  # on 128 tokens density moves in coarse steps: the nearest one
    assert uniform.meta["achieved"]["density"] == pytest.approx(cal.mean_density(uniform.meta["t"]))
    assert len(set(uniform.layers[0]["prefill_options"][cal.knob.option])) == 1
    for p in (profile, uniform):
        path = tmp_path / f"{p.name}.json"
        p.save(path)
        with patch_model(model, method, profile=Profile.load(path)) as patch:
            model(torch.randint(3, 256, (1, 128)))
            assert patch.stats().layers[0]["prefill_method"] == method


def test_a_more_sensitive_head_gets_more_density(measured, data):
    cal = hess_measure(measured, _Tok(), "xattention", data=data, samples=2, lengths=(128,),
                       options=_options("xattention"), grid=6, progress=False)
    lo, hi = _reachable(cal)
    target = lo + 0.4 * (hi - lo)
    before = cal.redistribute(target).meta["per_layer"]["1"]["density"][2]
    cal.curves[1].output_term[:, 2] *= 1e4
    cal.curves[1].mass_term[:, 2] *= 1e4
    after = cal.redistribute(target)
    got = after.meta["per_layer"]["1"]["density"]
    assert got[2] >= before and got[2] == max(got)
    assert after.meta["sensitivity"]["top_heads"][0][:2] == [1, 2]
    uniform = cal.uniform(target)
    assert abs(uniform.meta["achieved"]["density"] - target) < 0.05
    layered = cal.redistribute(target, scope="layer")
    for row in layered.meta["per_layer"].values():
        assert abs(sum(row["density"]) / len(row["density"]) - target) <= 1.0 / len(row["density"])
    # a spread keeps every head within that many grid steps of the uniform point, the boosted head too
    dens = torch.cat([c.density.T for c in cal.curves.values()])
    g0 = int((dens.mean(0) - target).abs().argmin())
    window = set(cal.values[max(0, g0 - 1): g0 + 2])
    bounded = cal.redistribute(target, spread=1)
    assert bounded.meta["spread"] == 1
    assert {v for i in bounded.layers for v in bounded.layers[i]["prefill_options"][cal.knob.option]} <= window
    with pytest.raises(ValueError, match="spread is a number of grid steps"):
        cal.redistribute(target, spread=-1)


def test_damping_moves_the_cost_towards_the_raw_output_error(measured, data):
    """δ = 0 is the plain Fisher; a very large δ leaves only the damping term `½ λ Σ ‖e‖²`, so the
    allocation is the one that minimises the summed squared output error at the same density."""
    cal = hess_measure(measured, _Tok(), "xattention", data=data, samples=2, lengths=(128,),
                       options=_options("xattention"), grid=6, progress=False)
    lo, hi = _reachable(cal)
    target = lo + 0.4 * (hi - lo)
    assert cal.fisher_mean() > 0
    plain = cal.redistribute(target)
    assert cal.redistribute(target, damping=0.0).layers == plain.layers and plain.meta["damping"] == 0.0
    damped = cal.redistribute(target, damping=1e12)
    dens = torch.cat([c.density.T for c in cal.curves.values()])
    pick = allocate(dens, torch.cat([c.error_sq.T for c in cal.curves.values()]), target)
    want = [cal.values[int(g)] for g in pick]
    assert [v for i in sorted(damped.layers) for v in damped.layers[i]["prefill_options"][cal.knob.option]] == want
    assert damped.meta["damping"] == 1e12
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="damping is a multiple of the mean Fisher diagonal"):
            cal.redistribute(target, damping=bad)


def test_bad_inputs_are_refused(measured, data):
    model = measured
    for density in (0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match=r"density .*in \(0, 1\]"):
            hess(model, _Tok(), "xattention", density=density, data=data, samples=1, lengths=(64,))
    with pytest.raises(ValueError, match="no per-head knob.*xattention"):
        hess(model, _Tok(), "a_shape", density=0.5, data=data, samples=1, lengths=(64,))
    with pytest.raises(ValueError, match="leave it out"):
        hess(model, _Tok(), "xattention", density=0.5, data=data, samples=1, lengths=(64,),
             options={"threshold": 0.9})
    with pytest.raises(ValueError, match="scope must be one of model, layer"):
        hess(model, _Tok(), "xattention", density=0.5, scope="head", data=data, samples=1, lengths=(64,))
    with pytest.raises(ValueError, match="grid must hold at least 2"):
        hess_measure(model, _Tok(), "xattention", data=data, samples=1, lengths=(64,), grid=1)


def test_cli_hess_takes_a_density_target(capsys):
    from attnpatch.cli import main

    assert main(["calibrate", "--method", "xattention", "--hess", "--target-error", "0.05"]) == 2
    assert "--hess takes its target as --target-density" in capsys.readouterr().err
    assert main(["calibrate", "--method", "xattention", "--hess", "--target-density", "1.4"]) == 2
    assert "in (0, 1]" in capsys.readouterr().err


def test_the_loss_can_count_only_the_answer():
    """`loss_from` restricts the loss to the answer's tokens: its value is their mean cross-entropy, and
    the gradient reaches the attention outputs of the positions before the answer."""
    import torch.nn.functional as F

    from attnpatch.calibrate.hess_grad import _loss_backward

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    _, grads, losses = record_with_grads(model, [ids, ids], loss_from=[0, 36])
    with torch.no_grad():
        logits = model(ids).logits.float()
    full = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    answer = F.cross_entropy(logits[0, 35:-1], ids[0, 36:])
    assert losses[0] == pytest.approx(float(full), rel=1e-4) and losses[1] == pytest.approx(float(answer), rel=1e-4)
    g = grads[0][1]  # layer 0, the answer-only prompt: [1, Hq, L, D]
    assert g[:, :, :35].abs().sum() > 0  # earlier positions feed the answer through attention
    with pytest.raises(ValueError, match="one position per prompt"):
        record_with_grads(model, [ids], loss_from=[0, 1])
    with pytest.raises(ValueError, match="no token to predict"):
        _loss_backward(model, torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.long), loss_from=4)


def test_calibration_samples_end_with_the_answer(tmp_path):
    from attnpatch.calibrate.data import calibration_samples

    tok = _Tok()
    rows = [{"prompt": "the pass key is hidden here " * 6 + "what is it?", "answer": "4821"},
            {"text": "plain text without an answer " * 4}]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    qa, text = calibration_samples(tok, str(path), 2, 64)
    answer = tok(" 4821", add_special_tokens=False, return_tensors="pt").input_ids
    assert qa.ids.shape[1] == 64 and qa.loss_from == 64 - answer.shape[1]
    assert torch.equal(qa.ids[:, qa.loss_from:], answer)
    assert text.loss_from == 0 and text.ids.shape[1] == 64
