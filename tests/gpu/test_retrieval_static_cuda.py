"""On CUDA: `retrieval` under `generate(cache_implementation="static")`, which compiles the decode steps
(transformers' auto-compile: inductor, "reduce-overhead", not fullgraph), generates what it generates
from its dynamic cache, and the device holds only the fixed GPU part after the split. Skipped without a GPU."""

import pytest
import torch

import attnpatch
from attnpatch.cache.retrieval_layer import StaticRetrievalLayer, retrieval_report
from attnpatch.testing import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("index", ["exact", "key_ivf"])
def test_static_cache_generate_compiles_and_matches_the_dynamic_cache(index):
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4096, intermediate_size=512).to("cuda", torch.float32)
    ids = torch.randint(3, 256, (2, 600), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :17] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with attnpatch.patch_model(model, decode="retrieval", n_sink=8, window=64, top_k=96, index=index,
                               cluster_size=16, n_probe=8):
        dynamic = model.generate(ids, **kw)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        try:
            static = model.generate(ids, cache_implementation="static", **kw)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        finally:
            torch._dynamo.reset()
    assert graphs > 0  # generate compiled the decode steps
    assert torch.equal(static.sequences, dynamic.sequences)
    cache = static.past_key_values
    assert all(isinstance(layer, StaticRetrievalLayer) and layer.keys.is_cuda for layer in cache.layers)
    report = retrieval_report(cache)
    room = cache.layers[0].max_cache_len - 600
    assert report["gpu_tokens"] == len(cache.layers) * (8 + 64 + room)
    assert report["cpu_tokens"] == len(cache.layers) * (600 - 72)
