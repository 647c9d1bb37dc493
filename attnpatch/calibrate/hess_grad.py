"""HeSS step 1 (methods.md §4.2, step 2): per prompt, one dense forward and one backward pass of the LM
loss give every layer's attention output gradient `g_h = ∂Loss/∂O_h` per query head, next to the Q/K/V
the layer received (recorded through the probe, as `record_layers` does).

`O_h` is what the attention function returns for head h, i.e. head h's slice of `o_proj`'s input: a forward pre-hook
on each attention module's `o_proj` hooks that tensor's gradient (no model forward is copied). The loss is the mean
next-token cross-entropy over the prompt (or over its answer: `loss_from`); the LM head runs on chunks of tokens, so
the `[L, vocab]` logits never exist at once. Parameters are frozen for the pass (no parameter gradients are kept); the
graph starts at the input embeddings. With `checkpointing`, the model's own gradient checkpointing keeps only each
decoder layer's input for the backward pass, and the hooks record during the first forward only (the backward's
recomputation is ignored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attnpatch.api import patch_model
from attnpatch.calibrate.record import LayerInputs, recorder

_LOSS_CHUNK = 1024  # tokens per LM-head chunk


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """`{layer index: attention module}` of the decoder: modules with an int `layer_idx` and an `o_proj`."""
    out = {}
    for mod in model.get_decoder().modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and isinstance(getattr(mod, "o_proj", None), torch.nn.Module):
            out[idx] = mod
    if not out:
        raise ValueError(f"{type(model).__name__}: no attention module with `layer_idx` and `o_proj` found; "
                         "HeSS hooks the attention output at o_proj's input")
    return dict(sorted(out.items()))


def _loss_backward(model, hidden: torch.Tensor, ids: torch.Tensor, loss_from: int = 0) -> float:
    """Mean next-token cross-entropy from the decoder's last hidden state over the tokens from `loss_from`
    on (at least the second), backpropagated in token chunks."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    top = hidden.detach().requires_grad_()
    first = max(int(loss_from), 1) - 1  # the position that predicts token `loss_from`
    if first >= ids.shape[1] - 1:
        raise ValueError(f"loss_from {loss_from} leaves no token to predict in {ids.shape[1]} tokens")
    n = ids.shape[1] - 1 - first
    total = 0.0
    for s in range(first, ids.shape[1] - 1, _LOSS_CHUNK):
        e = min(ids.shape[1] - 1, s + _LOSS_CHUNK)
        logits = head(top[:, s:e]).float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, s + 1:e + 1].flatten(), reduction="sum") / n
        loss.backward()
        total += float(loss.detach())
    hidden.backward(top.grad)
    return total


@contextlib.contextmanager
def _frozen(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _checkpointed(model, on: bool):
    if not on:
        yield
        return
    was_training = model.training
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.25; 5.17 has the older name only
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()  # transformers checkpoints decoder layers in training mode only
    try:
        yield
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)


def record_with_grads(model, prompts: list[torch.Tensor], keep_window_layers: bool = False,
                      checkpointing: bool = False, loss_from: Sequence[int] | None = None,
                      ) -> tuple[dict[int, LayerInputs], dict[int, list[torch.Tensor]], list[float]]:
    """`(layers, grads, losses)`: every layer's recorded Q/K/V (as `record_layers`), per layer one float32
    gradient `[B, Hq, L, D]` per prompt (∂ mean LM loss / ∂ attention output), and each prompt's loss.
    `loss_from[i]`: the first token of prompt i the loss counts (default: all). Layers `record_layers`
    leaves out (windows shorter than the prompt) are left out here too."""
    if loss_from is not None and len(loss_from) != len(prompts):
        raise ValueError(f"loss_from needs one position per prompt: {len(loss_from)} for {len(prompts)} prompts")
    modules = attention_modules(model)
    if checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; use checkpointing=False")
    layers: dict[int, LayerInputs] = {}
    grads: dict[int, list[torch.Tensor]] = {}
    losses: list[float] = []
    forward = [False]  # hooks record during the first forward only, not the backward's recomputation

    def hook_for(idx: int, hq: int):
        def pre_hook(module, args):
            x = args[0]
            if not forward[0] or not x.requires_grad:
                return

            def keep(g: torch.Tensor) -> None:
                b, n, _ = g.shape
                grads.setdefault(idx, []).append(g.detach().float().view(b, n, hq, -1).transpose(1, 2).contiguous())

            x.register_hook(keep)

        return pre_hook

    handles = [m.o_proj.register_forward_pre_hook(hook_for(i, m.config.num_attention_heads))
               for i, m in modules.items()]
    try:
        with _frozen(model), _checkpointed(model, checkpointing), patch_model(model, "dense") as patch:
            patch.observe(recorder(layers, keep_window_layers, active=lambda: forward[0]))
            for n, ids in enumerate(prompts):
                ids = ids.to(model.device)
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
                forward[0] = True
                hidden = model.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state
                forward[0] = False
                losses.append(_loss_backward(model, hidden, ids, 0 if loss_from is None else loss_from[n]))
                del hidden, embeds
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(layers) - set(grads))
    if missing:
        raise RuntimeError(f"no attention-output gradient reached layers {missing}")
    return dict(sorted(layers.items())), {i: grads[i] for i in sorted(layers)}, losses
