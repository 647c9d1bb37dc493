"""`infiniretri`: InfiniRetri (arXiv 2502.12962) — read an input longer than the model's window chunk
by chunk, keeping between chunks only the tokens the model's own attention retrieves.

`read_long(model, ids, question_ids)` drives the reading on a model patched with
`decode="infiniretri"`; `generate_long(...)` reads and then generates, from a dynamic cache or
(`cache_implementation="static"`) from a static copy of what was kept, whose fixed-shape decode steps
compile. A plain `generate` on the patched model is dense, on either cache (the cache is only
compressed by the reader).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from transformers.cache_utils import DynamicCache

from attnpatch.adapters.cache_arg import cache_kwarg
from attnpatch.cache.infiniretri_layer import InfiniRetriLayer
from attnpatch.cache.static_copy import static_copy
from attnpatch.methods.base import DecodeContext, DecodeMethod
from attnpatch.options import option
from attnpatch.registry import register_decode


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@register_decode("infiniretri")
@dataclass
class InfiniRetri(DecodeMethod):
    """Chunked reading that keeps, after each chunk, the `budget` tokens the last layer's attention
    (of the question, or of the chunk's last `n_query` tokens) scores highest, for every layer.

    Choices, and where they depart from the paper:
    * The paper keeps the *token ids* of the sentences holding its top-K tokens and re-encodes them
      with the next chunk; here the retained tokens' *KV* is kept for all layers (no re-encoding:
      each token is encoded once), as top-`budget` tokens of the score below (no sentence splitter).
    * Score: attention probabilities of the scoring queries in layer `score_layer` (-1: the last, as
      the paper), summed over query heads and queries, then a box convolution of width `phrase`
      along the tokens so neighbouring tokens (a phrase) rise together (the paper's 1-D convolution).
    * RoPE: retained keys are re-rotated to positions `0..R-1` (a rotation by the position change,
      exact for RoPE) and each chunk is read at positions `R, R+1, …`, so positions never exceed
      `budget + chunk_size + question` — within the trained window for inputs of any length.
      Keeping original positions (as `streaming` does) would leave the trained range past it.
    * Candidates: every cached token but the question's (the question is appended to each chunk
      to score it, then dropped; it is read once more after the last chunk). The last chunk is not
      compressed: generation sees the retained tokens + the last chunk + the question.
    * Needs every layer to carry its cache layer (full-attention models): a sliding-window layer's
      own cache would keep original positions and disagree with the compacted ones.
    * Static cache: the reading needs its own dynamic layers (the kept set changes per chunk), so
      `read_long` always reads into a `DynamicCache`; what generation needs afterwards is fixed, so
      `generate_long(..., cache_implementation="static")` copies it into a `StaticCache` of the
      tokens kept + `max_new_tokens` slots and generates from that (compiled decode steps). A plain
      `generate` with a static cache keeps transformers' static layers and is dense.
    """

    full_density: ClassVar[dict] = {}  # plain generation is dense; `read_long` is what compresses

    budget: int = option(1024, "tokens kept between chunks", min=1)
    chunk_size: int = option(2048, "tokens read per chunk", min=8)
    phrase: int = option(5, "width of the box convolution that scores phrases", min=1)
    n_query: int = option(32, "without a question: the chunk's last tokens whose attention scores", min=1)
    score_layer: int = option(-1, "layer whose attention scores the tokens (-1: the last)", min=-1)

    def decode_cache_tokens(self, context: int) -> int:
        """After `read_long`, generation sees at most the kept tokens and the last chunk (plus the question)."""
        return min(context, self.budget + self.chunk_size)

    def cache_layer(self, layer_idx: int, config: Any) -> InfiniRetriLayer:
        layers = _text_config(config).num_hidden_layers
        target = layers - 1 if self.score_layer == -1 else self.score_layer
        if target >= layers:
            raise ValueError(f"option 'score_layer' of decode method 'infiniretri' must be -1 or a layer "
                             f"index < {layers}, got {self.score_layer}")
        layer = InfiniRetriLayer(layer_idx == target, self.phrase)
        layer.budget, layer.chunk_size, layer.n_query = self.budget, self.chunk_size, self.n_query
        return layer

    def observe_prefill(self, query: torch.Tensor, key: torch.Tensor, ctx: DecodeContext) -> None:
        if isinstance(ctx.cache_layer, InfiniRetriLayer):
            ctx.cache_layer.record_scores(query, key, ctx.scale)


class LongRead(NamedTuple):
    """What `read_long` leaves: the cache (holding all of `input_ids` but its last token) and the
    ids to continue from (`model.generate(read.input_ids, **{cache_kwarg(model): read.cache}, ...)`):
    the retained tokens, the last chunk and the question."""

    cache: DynamicCache
    input_ids: torch.Tensor
    retained: list[int]  # tokens kept after each compression


def _inv_freq(model) -> torch.Tensor:
    found = [m.inv_freq for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    distinct = [f for i, f in enumerate(found) if not any(f.shape == g.shape and torch.equal(f, g) for g in found[:i])]
    if len(distinct) != 1:
        raise ValueError(f"infiniretri re-rotates retained keys with the model's RoPE frequencies; found "
                         f"{len(distinct)} distinct rotary embeddings (expected one)")
    return distinct[0]


def _chunk_kwargs(model, cache: DynamicCache) -> dict[str, Any]:
    """Keyword arguments of every chunk's forward: the cache, and (the reader needs no logits) one row of
    logits where the model can be asked for it."""
    kwargs = {"use_cache": True, cache_kwarg(model): cache}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


@torch.no_grad()
def read_long(model, input_ids: torch.Tensor, question_ids: torch.Tensor | None = None) -> LongRead:
    """Read `input_ids` (`[B, L]`, no padding) chunk by chunk on a model patched with
    `decode="infiniretri"`, scoring with `question_ids` (`[B, Q]`, appended to every chunk and at
    the end) or, without one, each chunk's last `n_query` tokens. See `InfiniRetri`."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, length >= 2], got shape {tuple(input_ids.shape)}")
    device = model.device
    ids = input_ids.to(device)
    question = ids.new_zeros(ids.shape[0], 0) if question_ids is None else question_ids.to(device)
    if question.dim() != 2 or question.shape[0] != ids.shape[0]:
        raise ValueError(f"question_ids must be [batch, length] with batch {ids.shape[0]}, got {tuple(question.shape)}")
    cache = DynamicCache(config=model.config)
    chunk_kwargs = _chunk_kwargs(model, cache)
    model(input_ids=ids[:, :1], **chunk_kwargs)  # installs the method's cache layers (the first chunk goes on below)
    layers = cache.layers
    if not layers or not all(isinstance(layer, InfiniRetriLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise ValueError(f"read_long needs the model patched with decode='infiniretri' and every layer full "
                         f"attention; its cache layers are {kinds}")
    first = layers[0]
    chunk, budget, nq = first.chunk_size, first.budget, question.shape[1] or first.n_query
    limit = getattr(_text_config(model.config), "max_position_embeddings", None)
    if limit is not None and budget + chunk + question.shape[1] > limit:
        raise ValueError(f"budget {budget} + chunk_size {chunk} + question {question.shape[1]} tokens exceed the "
                         f"model's {limit} positions: lower the budget or the chunk size")
    scorer = [layer for layer in layers if layer.scores_here]
    inv_freq = _inv_freq(model)
    cached = ids[:, :1]  # token ids of what the cache holds, in order
    start, retained = 1, []
    while True:
        end = min(chunk * (1 + start // chunk), ids.shape[1])  # chunk boundaries at multiples of chunk_size
        last = end == ids.shape[1]
        piece = torch.cat([ids[:, start:end], question], 1)
        if last:
            if piece.shape[1] > 1:
                model(input_ids=piece[:, :-1], **chunk_kwargs)
            return LongRead(cache, torch.cat([cached, piece], 1), retained)
        for layer in scorer:
            layer.score_queries = nq
        model(input_ids=piece, **chunk_kwargs)
        for layer in scorer:
            layer.score_queries = 0
        scores = scorer[0].scores[:, : cached.shape[1] + end - start]  # the question is no candidate
        keep = scores.topk(min(budget, scores.shape[1]), dim=-1).indices.sort(-1).values
        for layer in layers:
            layer.compress(keep, inv_freq)
        cached = torch.cat([cached, ids[:, start:end]], 1).gather(1, keep)
        retained.append(keep.shape[1])
        start = end


@torch.no_grad()
def generate_long(model, input_ids: torch.Tensor, question_ids: torch.Tensor | None = None,
                  **generate_kwargs: Any) -> torch.Tensor:
    """`read_long`, then `model.generate` from what it kept; returns the new tokens only `[B, T]`.

    `cache_implementation="static"` (with `max_new_tokens`): generation runs from a `StaticCache` copy
    of the kept tokens with `max_new_tokens` free slots (fixed-shape decode steps: transformers compiles
    them on CUDA); the tokens are those of the dynamic cache. Other cache implementations are refused."""
    implementation = generate_kwargs.pop("cache_implementation", None)
    if implementation not in (None, "dynamic", "static"):
        raise ValueError(f"generate_long: cache_implementation must be 'dynamic' or 'static', got {implementation!r}")
    new_tokens = generate_kwargs.get("max_new_tokens")
    if implementation == "static" and not isinstance(new_tokens, int):
        raise ValueError("generate_long with cache_implementation='static' needs max_new_tokens (an int): it sizes "
                         "the static cache")
    read = read_long(model, input_ids, question_ids)
    cache = read.cache
    if implementation == "static":
        cache = static_copy(cache, model.config, read.input_ids.shape[1] + new_tokens)
    out = model.generate(read.input_ids, **{cache_kwarg(model): cache}, **generate_kwargs)
    return out[:, read.input_ids.shape[1]:]
