"""Calibration: per-head knob search on recorded Q/K/V, the profile it writes, and its use."""

import json

import pytest
import torch
from method_cases import CharTokenizer, calibration_options

from attnpatch import patch_model
from attnpatch.calibrate import calibrate
from attnpatch.calibrate.data import calibration_ids
from attnpatch.calibrate.record import record_layers
from attnpatch.calibrate.run import calibratable_methods
from attnpatch.calibrate.search import evaluate, search_layer
from attnpatch.options import Knob
from attnpatch.profile import Profile
from attnpatch.registry import get_method, method_infos
from attnpatch.testing import tiny_model

_options = calibration_options
_Tok = CharTokenizer


@pytest.fixture(scope="module")
def recorded():
    model = tiny_model("llama")
    torch.manual_seed(0)
    prompts = [torch.randint(3, 256, (1, 192)) for _ in range(2)]
    return model, prompts, record_layers(model, prompts)


def test_every_method_with_a_knob_is_calibratable_and_knobs_name_per_head_options():
    names = calibratable_methods()
    assert set(names) >= {"xattention", "sale", "flexprefill", "proxyattn", "s2o", "anchor", "blasst"}
    for info in method_infos("prefill"):
        knob = getattr(info.cls, "knob", None)
        if knob is not None:
            assert info.spec(knob.option).per_head, f"{info.name}: knob {knob.option} is not a per-head option"


def test_knob_maps_density_coordinate_to_values():
    lin = Knob("threshold", 0.5, 1.0, denser="higher")
    assert lin.value(torch.tensor([0.0, 1.0])).tolist() == [0.5, 1.0]
    log = Knob("tau", 1e-4, 1e-2, denser="lower", log=True)
    assert torch.allclose(log.value(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([1e-2, 1e-3, 1e-4]), rtol=1e-5)
    with pytest.raises(ValueError, match="denser"):
        Knob("x", 0, 1, denser="up")


def test_recording_sees_every_layer_once_per_prompt(recorded):
    model, prompts, layers = recorded
    assert list(layers) == [0, 1]
    assert all(len(rec.query) == len(prompts) and rec.query[0].shape[2] == 192 for rec in layers.values())


@pytest.mark.parametrize("method", calibratable_methods())
def test_search_meets_the_tolerance_per_head_or_ends_at_the_densest_value(recorded, method):
    _, _, layers = recorded
    info = get_method(method, "prefill")
    knob = info.cls.knob
    layer = layers[1]
    tolerance = 0.08
    fit = search_layer(info, knob, _options(method), layer, tolerance, steps=4)
    hq = layer.query[0].shape[1]
    assert len(fit.values) == len(fit.error) == len(fit.density) == hq
    densest = knob.value(torch.ones(1)).item()
    for value, err in zip(fit.values, fit.error, strict=True):
        assert err <= tolerance + 1e-9 or value == pytest.approx(densest)
        assert knob.low <= value <= knob.high or value == info.cls.full_density.get(knob.option)
    # the reported error is what the method really does with those values
    from attnpatch.calibrate.search import dense_outputs

    err, den = evaluate(info, {**_options(method), knob.option: fit.values}, layer, dense_outputs(layer))
    assert torch.allclose(err, torch.tensor(fit.error, dtype=torch.float64), atol=1e-6)


def test_calibrate_writes_a_profile_that_patches_and_refuses_another_method(tmp_path):
    model = tiny_model("llama")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 8})
                              for _ in range(2)))
    profile = calibrate(model, _Tok(), "xattention", target_error=0.1, data=str(data), samples=2, lengths=(128,),
                        options=_options("xattention"), steps=3, progress=False)
    assert profile.meta["method"] == "xattention" and profile.meta["knob"] == "threshold"
    assert set(profile.layers) == {0, 1}
    assert len(profile.layers[0]["prefill_options"]["threshold"]) == 4
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = Profile.load(path)
    ids = torch.randint(3, 256, (1, 128))
    with patch_model(model, "xattention", profile=loaded) as patch:
        model(ids)
        assert patch.stats().layers[0]["prefill_method"] == "xattention"
    with pytest.raises(ValueError, match="calibrated for method 'xattention'"):
        patch_model(model, "sale", profile=loaded)
    with pytest.raises(ValueError, match="calibratable"):
        calibrate(model, _Tok(), "a_shape", data=str(data), samples=1, lengths=(64,))
    with pytest.raises(ValueError, match="leave it out"):
        calibrate(model, _Tok(), "xattention", data=str(data), samples=1, lengths=(64,), options={"threshold": 0.9})


def test_calibration_data_is_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    with pytest.raises(ValueError, match="'text', or 'prompt'"):
        calibration_ids(_Tok(), str(bad), 1, 8)
    with pytest.raises(ValueError, match="text, passkey, mixed or a JSONL file"):
        calibration_ids(_Tok(), "nothing-here", 1, 8)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "abc"}\n')
    with pytest.raises(ValueError, match="of at least 8 tokens"):
        calibration_ids(_Tok(), str(short), 1, 8)


def test_mixed_data_alternates_text_and_passkey_prompts():
    from attnpatch.calibrate.data import calibration_samples

    tok = _Tok()
    mixed = calibration_ids(tok, "mixed", 3, 256)
    text, passkey = calibration_ids(tok, "text", 2, 256), calibration_ids(tok, "passkey", 1, 256)
    assert [m.shape for m in mixed] == [(1, 256)] * 3
    assert torch.equal(mixed[0], text[0]) and torch.equal(mixed[1], passkey[0]) and torch.equal(mixed[2], text[1])
    samples = calibration_samples(tok, "mixed", 2, 256)
    assert samples[0].loss_from == 0 and samples[1].loss_from > 0  # the passkey prompt ends with its answer
    assert len(calibration_ids(tok, "mixed", 1, 256)) == 1


def test_blasst_density_counts_skipped_tiles(recorded):
    _, _, layers = recorded
    info = get_method("blasst", "prefill")
    from attnpatch.calibrate.search import dense_outputs

    layer = layers[1]
    _, none_skipped = evaluate(info, {"block_size": 16, "a": 0.0}, layer, dense_outputs(layer))
    _, many_skipped = evaluate(info, {"block_size": 16, "a": 1e6}, layer, dense_outputs(layer))
    assert torch.allclose(none_skipped, torch.ones_like(none_skipped)) and bool((many_skipped < 1).all())


@pytest.mark.parametrize("bounds", ["plain", "window", "padding"])
def test_masked_block_attention_equals_the_reference(bounds):
    from attnpatch.backends.reference import block_sparse_attention
    from attnpatch.calibrate.search import masked_block_attention
    from attnpatch.sparsity import BlockSelection, KeyBounds

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 70, 8, generator=g) for h in (4, 2, 2))
    kb = {"plain": KeyBounds(), "window": KeyBounds(window=20),
          "padding": KeyBounds(key_start=torch.tensor([0, 9]))}[bounds]
    blocks = torch.rand(2, 4, 5, 5, generator=g) < 0.5
    blocks |= torch.eye(5, dtype=torch.bool)  # the diagonal: every row sees itself
    sel = BlockSelection.from_block_mask(blocks & torch.ones(5, 5, dtype=torch.bool).tril(), 16, 16, 70, 70)
    ref = block_sparse_attention(q, k, v, sel, scale=0.3, bounds=kb)
    got = masked_block_attention(q, k, v, sel, 0.3, kb)
    rows = kb.dense_mask(2, 70, 70).any(-1, keepdim=True)  # rows that see some key
    torch.testing.assert_close(got * rows, ref.float() * rows, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bounds", ["plain", "window", "padding"])
@pytest.mark.parametrize(("block_q", "block_k"), [(16, 16), (32, 16), (16, 32)])
@pytest.mark.parametrize("rows", [16, 512])  # row chunks of `compute` (16: several, clipped at each diagonal)
def test_block_partials_attend_like_the_reference(bounds, block_q, block_k, rows, monkeypatch):
    from attnpatch.backends.reference import block_sparse_attention
    from attnpatch.calibrate import block_partials
    from attnpatch.calibrate.block_partials import BlockPartials
    from attnpatch.sparsity import BlockSelection, KeyBounds, num_blocks

    monkeypatch.setattr(block_partials, "ROWS", rows)

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 70, 8, generator=g) for h in (4, 2, 2))
    kb = {"plain": KeyBounds(), "window": KeyBounds(window=20),
          "padding": KeyBounds(key_start=torch.tensor([0, 9]))}[bounds]
    partials = BlockPartials.compute(q, k, v, 0.3, kb, block_k)
    r, c = num_blocks(70, block_q), num_blocks(70, block_k)
    rows = kb.dense_mask(2, 70, 70).any(-1, keepdim=True)
    for _ in range(3):  # several selections from one set of partials
        blocks = torch.rand(2, 4, r, c, generator=g) < 0.5
        first_key = torch.arange(r).view(r, 1) * block_q // block_k  # the block holding each row block's first row
        blocks |= torch.arange(c).view(1, c) >= first_key  # every row keeps its own and later (causal-clipped) blocks
        sel = BlockSelection.from_block_mask(blocks, block_q, block_k, 70, 70)
        ref = block_sparse_attention(q, k, v, sel, scale=0.3, bounds=kb)
        torch.testing.assert_close(partials.attend(sel) * rows, ref.float() * rows, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bounds", ["plain", "window", "padding"])
@pytest.mark.parametrize(("block_q", "block_k"), [(16, 16), (32, 16)])
@pytest.mark.parametrize("shared", [True, False])  # one selection for every head (strided), or per head
def test_block_partials_skip_like_the_reference(bounds, block_q, block_k, shared, monkeypatch):
    """BLASST's run-time skips decided from the partials' row maxima: the same slots as the reference
    executor skips and the same output, for one log threshold and for one per query head; and the same
    again from partials computed one row chunk at a time, every selection in one pass."""
    from attnpatch.backends.reference import block_sparse_attention
    from attnpatch.calibrate import block_partials
    from attnpatch.calibrate.block_partials import BlockPartials, attend_in_row_chunks
    from attnpatch.sparsity import BlockSelection, KeyBounds, SkipRule, num_blocks

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 70, 8, generator=g) * 2 for h in (4, 2, 2))
    kb = {"plain": KeyBounds(), "window": KeyBounds(window=20),
          "padding": KeyBounds(key_start=torch.tensor([0, 9]))}[bounds]
    partials = BlockPartials.compute(q, k, v, 0.5, kb, block_k)
    r, c = num_blocks(70, block_q), num_blocks(70, block_k)
    first_key = torch.arange(r).view(r, 1) * block_q // block_k
    causal = torch.arange(c).view(1, c) <= (torch.arange(r).view(r, 1) + 1) * block_q // block_k
    blocks = (torch.rand(2, 1 if shared else 4, r, c, generator=g) < 0.7) | (torch.arange(c).view(1, c) >= first_key)
    base = BlockSelection.from_block_mask((blocks & causal).expand(2, 4, r, c) if shared else blocks & causal,
                                          block_q, block_k, 70, 70)
    if shared:
        base = BlockSelection(base.indices[:, :1].expand(2, 4, -1, -1), base.counts[:, :1].expand(2, 4, -1),
                              block_q, block_k, 70, 70)
    rows = kb.dense_mask(2, 70, 70).any(-1, keepdim=True)
    seen, sels, refs = 0, [], []
    for thr in (0.0, -1.0, torch.tensor([0.5, -1.0, -3.0, float("-inf")])):
        sel = BlockSelection(base.indices, base.counts, block_q, block_k, 70, 70, SkipRule(thr))
        want = torch.zeros(sel.indices.shape, dtype=torch.bool)
        ref = block_sparse_attention(q, k, v, sel, scale=0.5, bounds=kb, skipped_out=want)
        got = partials.skipped(sel)
        assert torch.equal(got, want)
        seen += int(got.sum())
        torch.testing.assert_close(partials.attend(sel, got) * rows, ref.float() * rows, atol=1e-5, rtol=1e-5)
        sels.append(sel)
        refs.append((ref, want))
    assert seen > 0  # some tiles were skipped
    sels.append(base)  # and one selection without a skip rule
    refs.append((block_sparse_attention(q, k, v, base, scale=0.5, bounds=kb), None))
    monkeypatch.setattr(block_partials, "MAX_ELEMENTS", 2 * 4 * c * 10 * (block_q + 1))  # chunks of block_q rows
    monkeypatch.setattr(block_partials, "ROWS", 8)  # inner chunks split a query block
    for (out, skipped), (ref, want) in zip(attend_in_row_chunks(q, k, v, 0.5, kb, sels), refs, strict=True):
        torch.testing.assert_close(out * rows, ref.float() * rows, atol=1e-5, rtol=1e-5)
        assert (skipped is None) == (want is None) and (want is None or torch.equal(skipped, want))


@pytest.mark.parametrize("bounds", ["plain", "window"])
def test_block_partials_stay_on_the_inputs_device(bounds):
    """Partials, skip decisions and outputs are made on the query's device: the meta device stands in for
    a GPU here (a tensor made on the CPU cannot mix with it), as the H200 calibration of blasst needs."""
    from attnpatch.calibrate.block_partials import BlockPartials, attend_in_row_chunks
    from attnpatch.sparsity import BlockSelection, KeyBounds, SkipRule

    meta = torch.device("meta")
    q, k, v = (torch.empty(2, h, 70, 8, device=meta) for h in (4, 2, 2))
    kb = {"plain": KeyBounds(), "window": KeyBounds(window=20)}[bounds]
    part = BlockPartials.compute(q, k, v, 0.5, kb, 16)
    base = BlockSelection.from_block_mask(torch.ones(2, 4, 5, 5, dtype=torch.bool).tril(), 16, 16, 70, 70)
    base = BlockSelection(base.indices.to(meta), base.counts.to(meta), 16, 16, 70, 70)
    skip = BlockSelection(base.indices, base.counts, 16, 16, 70, 70, SkipRule(torch.tensor([0.5, -1.0, -3.0, 0.0])))
    dropped = part.skipped(skip)
    assert {part.m.device, dropped.device, part.attend(skip, dropped).device} == {meta}
    outs = attend_in_row_chunks(q, k, v, 0.5, kb, [skip, base])
    assert {t.device for out in outs for t in out if t is not None} == {meta}


@pytest.mark.parametrize("method", [m for m in calibratable_methods()
                                    if get_method(m, "prefill").cls.knob.option
                                    in get_method(m, "prefill").cls.full_density])
def test_heads_out_of_range_take_the_full_density_value(recorded, method):
    """Searched over the sparsest tenth of its range only, with a tolerance (1e-5) that range misses,
    every head ends at the method's full-density options (the knob's, e.g. s2o's τ = 0, and its other
    per-head ones, e.g. ProxyAttn's min_blocks), measured there: within the tolerance, at density 1."""
    from dataclasses import replace

    from attnpatch.calibrate.search import dense_outputs

    _, _, layers = recorded
    info = get_method(method, "prefill")
    knob = info.cls.knob
    ends = sorted(knob.value(torch.tensor([0.0, 0.1], dtype=torch.float64)).tolist())
    sparse = replace(knob, low=ends[0], high=ends[1])
    full = info.cls.full_density[knob.option]
    fit = search_layer(info, sparse, _options(method), layers[1], 1e-5, steps=2)
    assert max(fit.error) <= 1e-5 and min(fit.density) == pytest.approx(1.0)
    if method != "anchor":  # anchor keeps every key of these 192-token prompts even at its sparsest value
        assert fit.values == [full] * len(fit.values)
        others = {n: v for n, v in info.cls.full_density.items() if n != knob.option and info.spec(n).per_head}
        assert fit.extra == {n: [float(v)] * len(fit.values) for n, v in others.items()}
        options = {**_options(method), knob.option: fit.values, **fit.extra}  # what the profile holds
        err, den = evaluate(info, options, layers[1], dense_outputs(layers[1]))
        assert float(err.max()) <= 1e-5 and float(den.min()) == pytest.approx(1.0)


@pytest.mark.parametrize("cached", [True, False])  # partials cached per prompt, or one row-chunked pass
@pytest.mark.parametrize("method", calibratable_methods())
def test_evaluate_many_equals_evaluate(recorded, method, cached, monkeypatch):
    from attnpatch.calibrate import block_partials
    from attnpatch.calibrate.search import dense_outputs, evaluate_many

    _, _, layers = recorded
    layer = layers[1]
    info = get_method(method, "prefill")
    knob = info.cls.knob
    options = [{**_options(method), knob.option: float(knob.value(torch.tensor([t])))} for t in (0.1, 0.5, 0.9)]
    dense = dense_outputs(layer)
    want = [evaluate(info, o, layer, dense) for o in options]
    if not cached:
        monkeypatch.setattr(block_partials.BlockPartials, "fits", staticmethod(lambda *a: False))
        monkeypatch.setattr(block_partials, "MAX_ELEMENTS", 4 * 12 * 18 * 40)  # row chunks of 32 rows (4 heads, d 16)
    got = evaluate_many(info, options, layer, dense, partials={})
    for (err, den), (e, d) in zip(got, want, strict=True):
        torch.testing.assert_close(err, e, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(den, d, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("padding", [False, True])
def test_dense_outputs_of_a_window_layer_equal_the_masked_attention(padding, monkeypatch):
    from attnpatch.calibrate import search
    from attnpatch.calibrate.record import LayerInputs
    from attnpatch.eval.fidelity import exact_attention
    from attnpatch.sparsity import KeyBounds

    monkeypatch.setattr(search, "_WINDOW_ROWS", 16)  # several row chunks, each over its window's keys
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 70, 8, generator=g) for h in (4, 2, 2))
    kb = KeyBounds(window=20, key_start=torch.tensor([0, 9]) if padding else None)
    [got] = search.dense_outputs(LayerInputs(0, 0.3, 20, [q], [k], [v], [kb]))
    mask = kb.dense_mask(2, 70, 70)
    want = exact_attention(q, k, v, 0.3, mask)
    rows = mask.any(-1, keepdim=True)  # rows that see some key
    torch.testing.assert_close(torch.where(rows, got, 0.0), torch.where(rows, want, 0.0), atol=1e-6, rtol=1e-5)


def test_search_with_block_partials_equals_the_masked_search(recorded, monkeypatch):
    from attnpatch.calibrate import block_partials

    _, _, layers = recorded
    info = get_method("xattention", "prefill")
    fast = search_layer(info, info.cls.knob, _options("xattention"), layers[1], 0.08, steps=4)
    monkeypatch.setattr(block_partials.BlockPartials, "fits", staticmethod(lambda *a: False))
    slow = search_layer(info, info.cls.knob, _options("xattention"), layers[1], 0.08, steps=4)
    assert fast.values == slow.values
    torch.testing.assert_close(torch.tensor(fast.error), torch.tensor(slow.error), atol=1e-6, rtol=1e-5)


def test_shipped_profiles_fit_their_checkpoint():
    from pathlib import Path

    from attnpatch.models import gemma3_available, load

    files = sorted((Path(__file__).resolve().parents[1] / "calibration").glob("*.json"))
    assert files, "calibration/ ships at least one profile"
    models = {}
    for path in files:
        profile = Profile.load(path)
        assert profile.meta["command"].startswith("attnpatch calibrate") and profile.meta["seconds"] > 0
        name = profile.meta.get("model", "smollm2")  # profiles made before make_profiles.py are SmolLM2's
        if name == "gemma3-270m" and not gemma3_available():
            continue
        model = models.get(name) or models.setdefault(name, load(name, device="cpu")[0])
        with patch_model(model, profile.meta["method"], profile=profile) as patch:
            model(torch.randint(3, 1000, (1, 64)))
            assert patch.stats().layers[0]["prefill_method"] == profile.meta["method"]


def test_blasst_lambda_fit_over_lengths():
    from attnpatch.calibrate.blasst_fit import fit_lambda

    model = tiny_model("llama")
    torch.manual_seed(0)
    layers = record_layers(model, [torch.randint(3, 256, (1, n)) for n in (96, 192)])
    grid = [1e-3, 1e-2, 0.05, 0.2, 1.0]
    fit = fit_lambda(layers, grid, tolerance=0.05, block=16)
    assert [n for n, _ in fit.points] == [96, 192] and all(lam in grid for _, lam in fit.points)
    lam = torch.tensor([x for _, x in fit.points], dtype=torch.float64)
    logs = lam.log() + torch.tensor([96.0, 192.0], dtype=torch.float64).log()
    assert fit.a == pytest.approx(float(logs.mean().exp()))  # least squares of log λ ≈ log a − log L
    assert set(fit.skipped_at_a) == set(fit.skipped_at_fixed_lambda) == set(fit.error_at_a) == {96, 192}
    sparse = fit_lambda(layers, grid, target_skipped=0.2, block=16)
    assert all(0 <= s <= 1 for s in sparse.skipped_at_a.values())
    with pytest.raises(ValueError, match="exactly one"):
        fit_lambda(layers, grid, block=16)


def _estimated_with_option_selector():
    """Registered score-based methods whose selector reads one of their options (what may be cached)."""
    from attnpatch.methods.estimated import EstimatedPrefill

    out = []
    for info in method_infos("prefill"):
        selector = getattr(info.cls, "selector", None)
        if issubclass(info.cls, EstimatedPrefill) and selector is not None and \
                selector.param in {o.name for o in info.options}:
            out.append(info.name)
    return out


@pytest.mark.parametrize("method", _estimated_with_option_selector())
def test_estimate_ignores_the_selector_parameter(recorded, method):
    """The rule `EstimatedPrefill.estimate_ignores` states: the estimate is the same whatever the value of
    the option the selector reads (so calibration may reuse it)."""
    from attnpatch.methods.base import PrefillContext

    _, _, layers = recorded
    info = get_method(method, "prefill")
    param = info.cls.selector.param
    assert info.cls.estimate_ignores(param)
    layer = layers[1]
    q, k = layer.query[0], layer.key[0]
    ctx = PrefillContext(layer.layer, layer.scale, layer.bounds[0], layer.window)
    knob = getattr(info.cls, "knob", None)
    ends = [knob.value(torch.tensor([t])).item() for t in (0.0, 1.0)] if knob is not None and knob.option == param \
        else [info.spec(param).default, 0.0 if info.spec(param).default else 0.5]
    got = []
    for value in ends:
        method_obj = info.build({**_options(method), param: value}, q.shape[1])
        if method_obj.dense_reason(q.shape[2], k.shape[2], ctx) is not None:
            pytest.skip(f"{method} runs dense on the recorded prompt")
        got.append(method_obj.estimate(q, k, ctx))
    if got[0] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[0].values, got[1].values, rtol=0, atol=0)


@pytest.mark.parametrize("method", [m for m in calibratable_methods()
                                    if getattr(get_method(m, "prefill").cls, "estimate_ignores", None)])
def test_search_with_a_shared_estimate_equals_the_search_without(recorded, method, monkeypatch):
    from attnpatch.calibrate import search

    _, _, layers = recorded
    info = get_method(method, "prefill")
    calls = []
    original = info.cls.estimate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(info.cls, "estimate", counted)
    shared = search_layer(info, info.cls.knob, _options(method), layers[1], 0.08, steps=4)
    n_shared = len(calls)
    monkeypatch.setattr(search, "reuses_estimate", lambda *a: False)
    alone = search_layer(info, info.cls.knob, _options(method), layers[1], 0.08, steps=4)
    assert shared == alone
    n_alone = len(calls) - n_shared
    if info.cls.estimate_ignores(info.cls.knob.option):
        assert 0 < n_shared <= len(layers[1].query) < n_alone  # once per prompt, not once per bisection step
    else:
        assert n_shared == n_alone  # the knob feeds the estimate: nothing is shared
