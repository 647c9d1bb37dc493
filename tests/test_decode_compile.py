"""A decode step under torch.compile and on a static cache: the same tokens and logits as eager and as
the unpatched model, one graph without breaks, and the Triton decode kernel as a custom op.

Compiled with backend "aot_eager" (tracing, functionalisation and the fake kernels, no code
generation: inductor's C++ build takes ~40 s on CPU; it works, see hf_decode for the GPU numbers).
"""

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import left_padded
from method_cases import small_options

import attnpatch
from attnpatch.masking import key_bounds
from attnpatch.registry import method_infos
from attnpatch.sparsity import PageSelection
from attnpatch.testing import tiny_model

DECODE = method_infos("decode")
STATIC_CASES = [("llama", None), ("qwen2", 8), ("qwen3", None), ("mistral", 8), ("gemma3", 8)]


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("family,window", STATIC_CASES, ids=[f for f, _ in STATIC_CASES])
@pytest.mark.parametrize("info", DECODE, ids=[m.name for m in DECODE])
def test_static_cache_generates_like_unpatched(family, window, info):
    """`cache_implementation="static"` under every decode method at full density: the unpatched static
    tokens, on a left-padded batch (the keys are the whole preallocated buffer; unwritten slots masked).
    A method that cannot run on a static cache refuses it with its reason."""
    model = tiny_model(family, sliding_window=window)
    ids, mask = left_padded(2, 24, [0, 5])
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    ref = model.generate(ids, **kw)
    with attnpatch.patch_model(model, decode=info.name, **dict(small_options(info), **info.cls.full_density)) as p:
        if info.cls.static_cache_reason is not None:
            with pytest.raises(ValueError, match="cannot run on a static cache"):
                model.generate(ids, **kw)
            return
        out = model.generate(ids, **kw)
        stats = p.stats()
    assert torch.equal(out, ref)
    assert all(d["decode_calls"] == 4 for d in stats.layers)


def test_decode_bounds_of_a_static_cache_mask():
    """A decode step's mask row is taken as per-key validity with its written length, no analysis."""
    valid = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    valid[0, ..., :30] = True
    valid[1, ..., 7:25] = True  # left padding, then unwritten slots
    bounds = key_bounds(valid, 1, 40, None)
    assert torch.equal(bounds.key_valid, valid[:, 0, 0]) and bounds.key_end.tolist() == [30, 25]
    assert bounds.mask is None and bounds.key_start is None


def test_static_cache_step_derives_its_bounds_once(monkeypatch):
    """The layers of a decode step on a static cache (steps as the decode benchmark makes them, the mask
    built inside the forward) share one wrapped mask row, so the bounds (validity, written length, first
    key) are derived once per step, not once per layer, which a compiled step would repeat."""
    from transformers.cache_utils import StaticCache

    import attnpatch.masking as masking

    calls = []
    real = masking._validity_bounds
    monkeypatch.setattr(masking, "_validity_bounds", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))

    def decode():
        cache = StaticCache(config=model.config, max_cache_len=30)
        kw = {_cache_kw(model): cache}
        with torch.no_grad():
            tok, out = model(ids, **kw).logits[:, -1:].argmax(-1), []
            for _ in range(3):
                out.append(model(input_ids=tok, **kw).logits[:, -1])
                tok = out[-1].argmax(-1, keepdim=True)
        return torch.stack(out)

    ref = decode()
    with attnpatch.patch_model(model, decode="quest", budget=48, page_size=16, dense_layers=0) as p:
        out = decode()
        assert p.stats().layers[0]["decode_calls"] == 3
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # the budget covers the cache
    assert len(calls) == 3  # one per decode step, shared by the 3 layers


def test_generate_with_a_static_cache_derives_the_bounds_once_per_step(monkeypatch):
    """`generate(cache_implementation="static")` builds each step's mask before the forward; the layers
    still share one derivation of its bounds (the dispatch maps the dense tensor the model receives back
    to the mask it stands for), and the tokens equal the unpatched model's with a budget that covers
    the cache. Left padding, so the mask row is not trivial."""
    import attnpatch.masking as masking

    calls = []
    real = masking._validity_bounds
    monkeypatch.setattr(masking, "_validity_bounds", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[1, :5] = 0

    def generate():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=padding, max_new_tokens=4, do_sample=False,
                                  cache_implementation="static", pad_token_id=0)

    ref = generate()
    with attnpatch.patch_model(model, decode="quest", budget=48, page_size=16, dense_layers=0) as p:
        out = generate()
        steps = p.stats().layers[0]["decode_calls"]
    assert steps == 3 and torch.equal(out, ref)
    assert len(calls) == steps  # one per decode step, shared by the 3 layers


def test_page_lists_stop_at_the_written_length():
    sel = PageSelection.all_pages(2, 3, 100, 16)
    clipped = sel.clipped(torch.tensor([33, 0]))
    assert clipped.counts.tolist() == [[3, 3, 3], [0, 0, 0]]
    idx = torch.tensor([[[0, 2, 5, 6, 0]]], dtype=torch.int32)
    sparse = PageSelection(idx, torch.tensor([[4]], dtype=torch.int32), 16, 112)
    assert sparse.clipped(torch.tensor([81])).counts.tolist() == [[3]]  # pages 0, 2, 5 start below 81


def _eager_and_compiled_steps(model, prompt: int, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of `steps` greedy decode steps after a left-padded prompt of `prompt` tokens on a static cache
    of `prompt + 4` slots, run eager, then compiled with fullgraph=True (any graph break fails)."""
    from transformers.cache_utils import StaticCache

    ck = _cache_kw(model)
    ids, mask = left_padded(2, prompt, [0, 5])
    full = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], dim=1)

    def decode(step_fn):
        cache = StaticCache(config=model.config, max_cache_len=prompt + 4)
        with torch.no_grad():
            tok = model(ids, attention_mask=mask, **{ck: cache}).logits[:, -1:].argmax(-1)
            logits = []
            for i in range(steps):
                n = prompt + 1 + i
                pos = full[:, :n].cumsum(-1)[:, -1:] - 1
                out = step_fn(input_ids=tok, attention_mask=full[:, :n], position_ids=pos, **{ck: cache})
                logits.append(out.logits[:, -1])
                tok = logits[-1].argmax(-1, keepdim=True)
        return torch.stack(logits)

    eager = decode(model)
    torch._dynamo.reset()
    try:
        compiled = decode(torch.compile(model, backend="eager", fullgraph=True, dynamic=False))
    finally:
        torch._dynamo.reset()
    return eager, compiled


def test_compiled_decode_step_equals_eager_without_graph_breaks():
    """A patched decode step on a static cache of Gemma 3 (a sliding and a full layer, left padding),
    compiled with fullgraph=True (which fails on any graph break): eager's logits, and no stats kept."""
    model = tiny_model("gemma3", sliding_window=8)
    with attnpatch.patch_model(model, decode="blasst", page_size=16, a=1.0) as patch:
        eager, compiled = _eager_and_compiled_steps(model, 20)
        stats = patch.stats()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert stats.layers[0]["decode_calls"] == 3  # the compiled steps keep no stats
    assert stats.backends == {"prefill: sdpa": 4, "decode: reference": 6}


_OP_SCRIPT = textwrap.dedent("""
    import torch
    import attnpatch
    from attnpatch.backends.triton.decode_op import sparse_decode_op
    from attnpatch.sparsity import PageSelection
    from attnpatch.testing import tiny_model
    from transformers.cache_utils import StaticCache

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((2, 4, 1, 16), (2, 2, 96, 16), (2, 2, 96, 16)))
    sel = PageSelection.all_pages(2, 2, 96, 16).clipped(torch.tensor([70, 96]))
    valid = torch.arange(96)[None, :] < torch.tensor([[70], [96]])
    args = (q, k, v, sel.indices.contiguous(), sel.counts, 16, 0.25, -3.0, None, None, valid)
    torch.library.opcheck(sparse_decode_op, args)
    # the decode kernel's per-page log-sum-exp (a Recycled refresh's ranking): the op, and its values
    from attnpatch.backends.reference.page_lse import listed_page_lse
    from attnpatch.backends.triton.decode_op import sparse_decode_page_lse_op
    part = PageSelection(torch.tensor([0, 2, 5], dtype=torch.int32).expand(2, 2, 3).contiguous(),
                         torch.tensor([[3, 2], [1, 3]], dtype=torch.int32), 16, 96)
    lse_args = (q, k, v, part.indices, part.counts, 16, 0.25, None, valid)
    torch.library.opcheck(sparse_decode_page_lse_op, lse_args)
    out, lse = sparse_decode_page_lse_op(*lse_args)
    want = listed_page_lse(q, k, part, 0.25, valid)
    assert torch.equal(torch.isinf(lse), torch.isinf(want)), (lse, want)
    torch.testing.assert_close(lse[torch.isfinite(want)], want[torch.isfinite(want)], rtol=1e-5, atol=1e-5)

    model = tiny_model("llama")
    ck = "cache" if "cache" in __import__("inspect").signature(model.model.forward).parameters else "past_key_values"
    ids = torch.randint(0, 256, (2, 20), generator=g)
    with attnpatch.patch_model(model, decode="blasst", page_size=16) as patch:
        cache = StaticCache(config=model.config, max_cache_len=24)
        with torch.no_grad():
            tok = model(ids, **{ck: cache}).logits[:, -1:].argmax(-1)
            eager = model(input_ids=tok, **{ck: cache}).logits
            for layer in cache.layers:
                layer.cumulative_length.fill_(20)
            graphs = []

            def backend(gm, inputs):
                graphs.append(gm)
                return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

            compiled = torch.compile(model, backend=backend, fullgraph=True)(input_ids=tok, **{ck: cache}).logits
    ops = [str(n.target) for n in graphs[0].graph.nodes]
    assert len(graphs) == 1 and ops.count("attnpatch.sparse_decode.default") == 2, ops
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert patch.stats().backends["decode: triton"] == 2  # the eager step ran the (interpreted) kernel
    print("OK")
""")


def test_decode_kernel_custom_op_under_the_interpreter():
    """`attnpatch::sparse_decode` passes `torch.library.opcheck`, compiles to the eager kernel's output,
    and is what a compiled patched decode step calls (once per layer, no graph break). A subprocess,
    since the interpreter must be on before the kernel module is imported."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", _OP_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


_BOUND_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import attnpatch
    import attnpatch.backends.triton.bound_decode_op as op_module
    from attnpatch.cache import key_page_bounds
    from attnpatch.testing import tiny_model
    from test_decode_compile import _eager_and_compiled_steps

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((2, 4, 1, 16), (2, 2, 96, 16), (2, 2, 96, 16)))
    lo, hi = key_page_bounds(k, 16)
    valid = torch.arange(96)[None, :] < torch.tensor([[70], [96]])
    counters = torch.zeros(8, dtype=torch.int32)  # declared unmutated: opcheck checks they come back as they were
    args = (q, k, v, lo, hi, torch.tensor([0, 1]), torch.tensor([5, 6]), 6, 3, 0, "softmax_sum", 16, 0.25, None, valid,
            counters)
    torch.library.opcheck(op_module.bound_decode_op, args)

    calls = []
    real = op_module.bound_decode_attention
    op_module.bound_decode_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    model = tiny_model(sys.argv[1], sliding_window=8 if sys.argv[1] == "gemma3" else None)
    with attnpatch.patch_model(model, decode="quest", budget=48, page_size=16, dense_layers=0) as patch:
        eager, compiled = _eager_and_compiled_steps(model, 60)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    full_layers = sum(t != "sliding_attention" for t in getattr(model.config, "layer_types", None) or ["full"] * 2)
    launches = 3 * full_layers if sys.argv[2] != "off" else 0  # one per full layer and compiled step
    assert len(calls) == launches, (len(calls), launches)
    print("OK")
""")


@pytest.mark.parametrize("switch", ["default", "off"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_compiled_quest_step_bounds_selects_and_attends_in_one_launch(family, switch):
    """Under the interpreter, a compiled `quest` step on a static cache hands its selection to the Triton
    backend (`BoundPages`, with the cache layer's barrier counters), which under the rule "auto" (4 batch × KV
    head rows, within `MAX_ROWS`; the default) runs `attnpatch::bound_decode` (opcheck'd) once per full-attention
    layer: eager's logits (the separate bounds, top-k and decode kernels), on a left-padded batch. With
    `ATTNPATCH_BOUND_DECODE_CONFIG=off` the backend declines and the step runs the separate kernels."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("ATTNPATCH_BOUND_DECODE_CONFIG", None)
    if switch == "off":
        env["ATTNPATCH_BOUND_DECODE_CONFIG"] = "off"
    res = subprocess.run([sys.executable, "-c", _BOUND_SCRIPT, family, switch], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# Options under which a decode method reads fewer keys than the tiny caches below hold (64 tokens, pages of
# 16); a new method is tested with `small_options` alone.
SPARSE_DECODE = {"quest": {"budget": 48, "dense_layers": 0}, "streaming": {"n_sink": 2, "window": 6},
                 "blasst": {"a": 1.0}, "retrieval": {"n_sink": 4, "window": 8, "top_k": 16}}
COMPILABLE = [m for m in DECODE if not m.cls.is_dense and m.cls.compiled_step_reason is None
              and m.cls.static_cache_reason is None and m.cls.fullgraph_reason is None]


@pytest.mark.parametrize("family,window", [("llama", None), ("gemma3", 8)], ids=["llama", "gemma3"])
@pytest.mark.parametrize("info", COMPILABLE, ids=[m.name for m in COMPILABLE])
def test_every_compilable_decode_method_compiles_to_its_eager_step(family, window, info):
    """Every decode method that runs on a static cache and in a compiled step, at a setting that reads a
    part of the cache: three steps compiled with fullgraph=True (no graph break) give eager's logits, on
    a left-padded batch."""
    model = tiny_model(family, sliding_window=window)
    options = small_options(info) | SPARSE_DECODE.get(info.name, {})
    with attnpatch.patch_model(model, decode=info.name, **options):
        eager, compiled = _eager_and_compiled_steps(model, 60)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


GRAPH_BREAKING = [m for m in DECODE if m.cls.fullgraph_reason is not None and m.cls.static_cache_reason is None]


@pytest.mark.parametrize("info", GRAPH_BREAKING, ids=[m.name for m in GRAPH_BREAKING])
def test_a_method_with_graph_breaks_compiles_once_on_a_static_cache(info):
    """A decode method whose compiled step is not one graph (`fullgraph_reason`, e.g. `retrieval`'s wait for
    the CPU search), at a setting that reads a part of the cache: compiled without fullgraph on a static
    cache, its steps give eager's logits on a left-padded batch, and after the second step (the first one
    changes the cache's layout) no step compiles again. The padding mask has the cache's fixed width (as
    `generate` passes it), and the recompile limit is raised so that dynamo never gives up and runs eagerly;
    a DynamicCache recompiles at every step under the same conditions."""
    from transformers.cache_utils import DynamicCache, StaticCache

    model = tiny_model("llama")
    ck = _cache_kw(model)
    prompt, steps = 60, 6
    ids, mask = left_padded(2, prompt, [0, 5])
    wide = torch.cat([mask, torch.ones(2, steps + 2, dtype=mask.dtype)], dim=1)  # max_cache_len columns
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    def decode(step_fn, cache, after=None):
        with torch.no_grad():
            tok = model(ids, attention_mask=mask, **{ck: cache}).logits[:, -1:].argmax(-1)
            logits = []
            for i in range(steps):
                pos = torch.tensor([[prompt + i], [prompt - 5 + i]])
                logits.append(step_fn(input_ids=tok, attention_mask=wide, position_ids=pos,
                                      **{ck: cache}).logits[:, -1])
                tok = logits[-1].argmax(-1, keepdim=True)
                if i == 1 and after is not None:
                    after()
        return torch.stack(logits)

    options = small_options(info) | SPARSE_DECODE.get(info.name, {})
    static = StaticCache(config=model.config, max_cache_len=wide.shape[1])
    with attnpatch.patch_model(model, decode=info.name, **options), \
            torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
        eager = decode(model, StaticCache(config=model.config, max_cache_len=wide.shape[1]))
        counts = {}
        for name, cache in (("static", static), ("dynamic", DynamicCache(config=model.config))):
            torch._dynamo.reset()
            compiles.clear()
            try:
                out = decode(torch.compile(model, backend=backend, dynamic=False), cache,
                             after=lambda n=name: counts.setdefault(n, len(compiles)))
            finally:
                torch._dynamo.reset()
            counts[name] = (counts[name], len(compiles))
            if name == "static":
                torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    assert counts["static"][0] > 0 and counts["static"][1] == counts["static"][0], counts
    assert counts["dynamic"][1] > counts["dynamic"][0], counts  # the check can see a recompilation
    assert all(type(layer).__name__.startswith("Static") for layer in static.layers)


COMPILE_REFUSED = [m for m in DECODE if m.cls.compiled_step_reason is not None and m.cls.static_cache_reason is None]


@pytest.mark.parametrize("info", COMPILE_REFUSED, ids=[m.name for m in COMPILE_REFUSED])
def test_a_compiled_step_refuses_a_method_that_cannot_compile(info):
    """A decode method whose step cannot be compiled (e.g. `recycled`'s host-side schedule, which
    recompiled at every token) names its reason from inside `torch.compile`, where eager runs."""
    from transformers.cache_utils import StaticCache

    model = tiny_model("llama")
    ck = _cache_kw(model)
    ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with attnpatch.patch_model(model, decode=info.name, **small_options(info)):
        cache = StaticCache(config=model.config, max_cache_len=24)
        with torch.no_grad():
            tok = model(ids, **{ck: cache}).logits[:, -1:].argmax(-1)
            model(input_ids=tok, **{ck: cache})  # eager decode runs
            torch._dynamo.reset()
            try:
                with pytest.raises(Exception,
                                   match=f"decode method '{info.name}' cannot run in a compiled decode step"):
                    torch.compile(model, backend="eager", fullgraph=True)(input_ids=tok, **{ck: cache})
            finally:
                torch._dynamo.reset()


def test_quest_lists_skip_the_written_length_clip(monkeypatch):
    """Quest's page lists stop at its cache layer's written count already (`within_written`): a static-cache
    step runs no clip, and generates what it generates with the clip."""
    import attnpatch.methods.decode.quest as quest_module

    model = tiny_model("llama")
    ids, mask = left_padded(2, 120, [0, 5])  # 8 pages of 16: sparse at budget 48
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    clips = []
    clipped = PageSelection.clipped
    monkeypatch.setattr(PageSelection, "clipped", lambda self, end: clips.append(1) or clipped(self, end))
    options = dict(budget=48, page_size=16, dense_layers=0)
    with attnpatch.patch_model(model, decode="quest", **options):
        out = model.generate(ids, **kw)
    assert not clips
    monkeypatch.setattr(quest_module, "replace", lambda sel, **_: sel)  # the lists as before: clipped by dispatch
    with attnpatch.patch_model(model, decode="quest", **options):
        ref = model.generate(ids, **kw)
    assert clips and torch.equal(out, ref)


def test_recycled_compiled_steps_keep_its_schedule_on_the_device_without_recompiling(monkeypatch):
    """`recycled` compiled (fullgraph, aot_eager: traced and functionalised, no code generation): refreshes
    and recycled steps over 8 decode steps at stride 3 give eager's logits without recompiling from step to
    step, and the device schedule ends where eager's host one does. The compiled refreshes rank pages by the
    log-sum-exp the step's attention wrote (`attend.with_page_lse`), with no second pass (`page_lse`)."""
    from transformers.cache_utils import StaticCache

    from attnpatch.cache import StaticRecycledLayer
    from attnpatch.methods.decode import recycled as recycled_module

    model = tiny_model("llama")
    ck = _cache_kw(model)
    ids, mask = left_padded(2, 60, [0, 5])
    steps = 8
    full = torch.cat([mask, torch.ones(2, steps + 1, dtype=mask.dtype)], dim=1)  # one more: an eager step
    graphs = []

    def counting(gm, inputs):  # functionalised as inductor would (cond branches must not alias their inputs)
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    def decode(step_fn, cache):
        with torch.no_grad():
            tok = model(ids, attention_mask=mask, **{ck: cache}).logits[:, -1:].argmax(-1)
            logits = []
            for i in range(steps):
                n = 60 + 1 + i
                pos = full[:, :n].cumsum(-1)[:, -1:] - 1
                # the whole static length's mask (one shape for every step, as generate's static path passes)
                out = step_fn(input_ids=tok, attention_mask=full, position_ids=pos, **{ck: cache})
                logits.append(out.logits[:, -1])
                tok = logits[-1].argmax(-1, keepdim=True)
                after.append(len(graphs))
        return torch.stack(logits)

    after: list[int] = []
    with attnpatch.patch_model(model, decode="recycled", budget=48, stride=3, page_size=16):
        eager_cache = StaticCache(config=model.config, max_cache_len=61 + steps)
        eager = decode(model, eager_cache)
        compiled_cache = StaticCache(config=model.config, max_cache_len=61 + steps)
        torch._dynamo.reset()
        second_pass = []
        real = recycled_module.page_lse
        monkeypatch.setattr(recycled_module, "page_lse", lambda *a, **k: second_pass.append(1) or real(*a, **k))
        try:
            after.clear()
            compiled = decode(torch.compile(model, backend=counting, fullgraph=True, dynamic=False), compiled_cache)
        finally:
            torch._dynamo.reset()
            monkeypatch.setattr(recycled_module, "page_lse", real)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert second_pass == []
    # the schedule's counters are tensors: no compilation after the first steps (a second graph may come from
    # transformers' own state after the first call), through refreshes (steps 1, 4, 7) and recycled steps
    assert after[1] <= 2 and after[-1] == after[1], after
    for host, device in zip(eager_cache.layers, compiled_cache.layers, strict=True):
        assert isinstance(host, StaticRecycledLayer) and host.refreshes == 3  # steps 1, 4, 7
        schedule = device.device_schedule
        assert int(schedule.refresh_at) == host.refresh_length == 60 + 7 and int(schedule.steps) == 1
        for b in range(2):
            for h in range(host.pages.shape[1]):
                n = int(host.counts[b, h])
                assert schedule.pages[b, h, :n].tolist() == host.pages[b, h, :n].tolist()
    # an eager step after compiled ones resumes from the written length (and refreshes)
    with attnpatch.patch_model(model, decode="recycled", budget=48, stride=3, page_size=16), torch.no_grad():
        layer = compiled_cache.layers[0]
        assert layer.host_stale and layer.refreshes == 0
        model(input_ids=torch.ones(2, 1, dtype=torch.long), attention_mask=full,
              position_ids=torch.full((2, 1), 60 + steps), **{ck: compiled_cache})
        assert not layer.host_stale and layer.length == 61 + steps and layer.refreshes == 1


def test_recycled_compiled_step_on_a_dynamic_cache_says_it_needs_a_static_one():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ck = _cache_kw(model)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with attnpatch.patch_model(model, decode="recycled", budget=48, page_size=16):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            tok = model(ids, **{ck: cache}).logits[:, -1:].argmax(-1)
            torch._dynamo.reset()
            try:
                with pytest.raises(Exception, match="keeps its schedule in a static cache's layers"):
                    torch.compile(model, backend="eager", fullgraph=True)(input_ids=tok, **{ck: cache})
            finally:
                torch._dynamo.reset()


def test_first_real_position_from_every_form_of_mask():
    """Each row's first real position, which the sink-keeping cache layers need, from what a forward may get:
    a 2-D padding mask, or the masks `generate` builds ahead with a static cache (a dict of `AttnMask`s or
    4-D bool / additive float tensors); None where the mask says nothing of padding."""
    from attnpatch.api import _first_real
    from attnpatch.masking import AttnMask

    pad = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0]])  # row 1: 2 padding, then 3 real, 1 unwritten
    visible = pad.bool()
    four_bool = visible.view(2, 1, 1, 6).expand(2, 1, 3, 6)
    four_float = torch.zeros(2, 1, 3, 6).masked_fill(~four_bool, torch.finfo(torch.float32).min)
    wrapped = AttnMask(q_len=1, kv_len=6, key_valid=visible, window=None, sdpa_kwargs={})
    for mask in (pad, pad.float(), four_bool, four_float, {"full_attention": wrapped}, {"full_attention": four_float}):
        assert _first_real(mask).tolist() == [0, 2]
    assert _first_real(None) is None and _first_real({"sliding_attention": four_bool}) is None
    assert _first_real(AttnMask(q_len=1, kv_len=6, key_valid=None, window=None, sdpa_kwargs={})) is None


def test_a_decode_method_that_cannot_use_a_static_cache_refuses_it_with_its_reason():
    """The `static_cache_reason` extension point (no registered method sets it now): a patch refuses a
    static cache with the method's reason instead of running a step the method cannot take, and leaves a
    dynamic cache alone."""
    from dataclasses import dataclass

    from attnpatch.methods.base import DecodeMethod
    from attnpatch.registry import _TABLES, register_decode

    @register_decode("test_no_static")
    @dataclass
    class NoStatic(DecodeMethod):
        """Test only: reads every key; refuses a static cache."""

        static_cache_reason = "it keeps its own growing buffers (test)"

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    try:
        with attnpatch.patch_model(model, decode="test_no_static"):
            with pytest.raises(ValueError, match=r"'test_no_static' cannot run on a static cache .*growing buffers"):
                model.generate(ids, cache_implementation="static", **kw)
            assert model.generate(ids, **kw).shape == (1, 14)
    finally:
        _TABLES["decode"].pop("test_no_static", None)
