"""HeSS step 2 (methods.md §4.2, steps 3–4): per query head, the sensitivity-weighted sparsification
error of a method at several option settings, from recorded Q/K/V and attention-output gradients.

For head h, query row i, dense output `o_i`, gradient `g_i = ∂Loss/∂o_i`, and a selection keeping the
share `m_i` of row i's true softmax mass (the kept keys' outputs renormalised, as every executor does):

* output term: `e_i = o_i^sparse − o_i` (what the method really computes minus dense);
* mass term: the attention mass the selection drops, `(1 − m_i)`, applied along the dense output
  (`(1 − m_i) · o_i`, the error of dropping that mass without renormalising): it does not depend on
  whether the dropped keys' values happen to resemble the kept ones, so it flags heads whose selection
  misses mass even where the renormalised output is lucky on the calibration prompts.

Each term is turned into an estimated loss increase with a Fisher / Gauss–Newton Hessian `H ≈ g gᵀ`:
`form="fisher"`: `½ Σ_i (g_i · e_i)²` (the rank-one per-token Fisher, methods.md §4.2's first form);
`form="diagonal"`: `½ Σ_i Σ_d g_id² e_id²` (its diagonal: no cancellation across features).
Both are non-negative and zero where the selection keeps every key (e = 0, m = 1). The paper (HeSS,
VGGT) names two error terms without saying which; this pair is our choice (§4.2 [I]).

One exact softmax per row chunk serves every option setting: for block selections the per-key-block
partial outputs `P_c V_c` and masses are computed once and each setting only sums its blocks; token
selections take one masked `P·V` per setting. BLASST's run-time skips are measured by running its
executor and removing the skipped tiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnpatch.backends.reference import block_sparse_attention
from attnpatch.calibrate.layer_select import EstimateCache, reuses_estimate, select_on
from attnpatch.calibrate.record import LayerInputs
from attnpatch.eval.fidelity import computed_block_mask, listed_key_mask
from attnpatch.methods.base import DenseFallback
from attnpatch.registry import MethodInfo
from attnpatch.sparsity import BlockSelection, KeyBounds, num_blocks

FORMS = ("fisher", "diagonal")
_CHUNK_ELEMENTS = 1 << 24  # float32 elements of the largest per-chunk temporary (64 MiB)


@dataclass
class LayerCurves:
    """One layer, `[G, Hq]` per option setting g and query head (means over prompts): density, the output
    and mass terms (estimated loss increase, see the module docstring), relative output error, recall and
    the squared output error `Σ_i ‖e_i‖²`; `[Hq]` `grad_sq`: the mean `g_id²` of each head's gradient (its
    share of the Fisher diagonal)."""

    layer: int
    density: torch.Tensor
    output_term: torch.Tensor
    mass_term: torch.Tensor
    rel_error: torch.Tensor
    recall: torch.Tensor
    error_sq: torch.Tensor
    grad_sq: torch.Tensor

    def cost(self, weights: tuple[float, float] = (1.0, 1.0), damping: float = 0.0) -> torch.Tensor:
        """`[G, Hq]` sensitivity-weighted error: `w_out · output_term + w_mass · mass_term`, plus with a
        `damping` λ the damped Gauss–Newton term `½ λ Σ_i ‖e_i‖²` (the Hessian `g gᵀ + λ I`)."""
        cost = weights[0] * self.output_term + weights[1] * self.mass_term
        return cost + 0.5 * damping * self.error_sq if damping else cost


@dataclass
class Kept:
    """What one option setting keeps for one prompt: nothing dropped (dense), a block mask or a key mask."""

    blocks: torch.Tensor | None = None  # bool [B, H, R, C]
    keys: torch.Tensor | None = None  # bool [B, H, R, Lk]
    block_q: int = 1
    block_k: int = 1


def kept_by(info: MethodInfo, options: Mapping[str, Any], layer: LayerInputs, i: int,
            cache: EstimateCache | None = None) -> tuple[Kept, torch.Tensor]:
    """What the method keeps on prompt `i` of the layer, and its `[Hq]` density (kept / causal pairs);
    `cache`: the prompt's block scores shared across settings (`attnpatch.calibrate.layer_select`)."""
    q, k, v, bounds = layer.query[i], layer.key[i], layer.value[i], layer.bounds[i]
    hq = q.shape[1]
    sel = select_on(info.build(options, hq, where=f" (layer {layer.layer})"), layer, i, cache)
    if isinstance(sel, DenseFallback):
        return Kept(), torch.ones(hq, dtype=torch.float64)
    kept, total = sel.kept_and_total()
    if isinstance(sel, BlockSelection):
        skipped = None
        if sel.skip is not None:  # which tiles BLASST skips is decided while attending: run it
            skipped = torch.zeros(sel.indices.shape, dtype=torch.bool, device=q.device)
            block_sparse_attention(q, k, v, sel, scale=layer.scale, bounds=bounds, skipped_out=skipped)
            kept = kept - skipped.sum(dim=(0, 2, 3)).to(kept)
        return Kept(blocks=computed_block_mask(sel, skipped), block_q=sel.block_q, block_k=sel.block_k), \
            (kept / total).double().cpu()
    return Kept(keys=listed_key_mask(sel), block_q=sel.block_q), (kept / total).double().cpu()


def _visible(bounds: KeyBounds, b: int, batch: int, r0: int, r1: int, lq: int, lk: int, klen: int, device
             ) -> torch.Tensor:
    """`[rows, klen]`: which of the first `klen` of `lk` keys queries r0..r1 (of `lq`) of batch row b see."""
    seen = bounds.rows_mask(batch, lq, lk, (r0, r1), (0, klen), device)[b]
    if bounds.mask is not None:  # a tensor mask is applied with the causal rule
        seen = seen & (torch.arange(klen, device=device) <= torch.arange(r0, r1, device=device).view(-1, 1) + lk - lq)
    return seen


def _prompt_terms(layer: LayerInputs, i: int, grad: torch.Tensor, kept: list[Kept], form: str) -> torch.Tensor:
    """`[6, G, Hq]` sums over prompt i: output term, mass term, ‖e‖², ‖o‖² (per head), kept mass per row,
    and (the same for every setting) `Σ g²` of the head's gradient."""
    q, k, v, bounds = layer.query[i], layer.key[i], layer.value[i], layer.bounds[i]
    batch, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    grp = hq // hkv
    bk = next((x.block_k for x in kept if x.blocks is not None), 0)
    n_g = len(kept)
    acc = torch.zeros(6, n_g, hq, dtype=torch.float64, device=q.device)
    width = max(lk * (1 + (d if bk else 0) // max(bk, 1)), 1)
    rows = max(1, min(lq, _CHUNK_ELEMENTS // (hq * width)))
    for b in range(batch):
        qb, kb, vb = q[b].float(), k[b].float(), v[b].float()
        for r0 in range(0, lq, rows):
            r1 = min(lq, r0 + rows)
            kend = min(lk, lk - lq + r1)  # causal: no row of the chunk sees past this key
            cols = num_blocks(kend, bk) if bk else 0
            klen = min(lk, cols * bk) if bk else kend
            s = torch.matmul(qb[:, r0:r1].view(hkv, grp, r1 - r0, d), kb[:, None, :klen].transpose(-1, -2))
            s.mul_(layer.scale).masked_fill_(~_visible(bounds, b, batch, r0, r1, lq, lk, klen, q.device), float("-inf"))
            p = torch.softmax(s, -1)  # [Hkv, G, rows, klen]
            del s
            if not bounds.is_plain:  # rows that see no key (padding)
                p.nan_to_num_(0.0)
            out = torch.matmul(p, vb[:, None, :klen]).view(hq, r1 - r0, d)
            p = p.view(hq, r1 - r0, klen)
            g = grad[b, :, r0:r1].float()
            acc[5] += (g * g).sum((-1, -2)).double()
            go = (g * out).sum(-1)  # [H, rows]
            g2o2 = (g * g * out * out).sum(-1)
            ref2 = (out * out).sum((-1, -2))
            pad = cols * bk - klen if bk else 0
            if bk:
                pk = (torch.nn.functional.pad(p, (0, pad)) if pad else p).view(hq, r1 - r0, cols, bk)
                vk = torch.nn.functional.pad(vb[:, :klen], (0, 0, 0, pad)).view(hkv, 1, cols, bk, d)
                # [Hkv, G, cols, rows, D]
                block_out = torch.matmul(pk.view(hkv, grp, r1 - r0, cols, bk).transpose(2, 3), vk)
                block_out = block_out.transpose(2, 3).reshape(hq, r1 - r0, cols, d)
                block_mass = pk.sum(-1)  # [H, rows, cols]
            for j, x in enumerate(kept):
                acc[3, j] += ref2.double()
                if x.blocks is None and x.keys is None:
                    acc[4, j] += r1 - r0
                    continue
                if x.blocks is not None:
                    rb = torch.arange(r0, r1, device=q.device) // x.block_q
                    sel = x.blocks[b][:, rb, :cols].float()  # [H, rows, cols]
                    m = (block_mass * sel).sum(-1)
                    sparse = torch.einsum("hrc,hrcd->hrd", sel, block_out)
                else:
                    rb = torch.arange(r0, r1, device=q.device) // x.block_q
                    kept_p = p * x.keys[b][:, rb, :klen]
                    m = kept_p.sum(-1)
                    sparse = torch.matmul(kept_p.view(hkv, grp, r1 - r0, klen), vb[:, None, :klen]).view(hq, r1 - r0, d)
                e = sparse / m.clamp(min=1e-30).unsqueeze(-1) - out
                e = torch.where((m > 0).unsqueeze(-1), e, -out)  # a row keeping no visible key outputs 0
                lost = 1.0 - m
                if form == "fisher":
                    acc[0, j] += 0.5 * ((g * e).sum(-1) ** 2).sum(-1).double()
                    acc[1, j] += 0.5 * ((lost * go) ** 2).sum(-1).double()
                else:
                    acc[0, j] += 0.5 * (g * g * e * e).sum((-1, -2)).double()
                    acc[1, j] += 0.5 * (lost * lost * g2o2).sum(-1).double()
                acc[2, j] += (e * e).sum((-1, -2)).double()
                acc[4, j] += m.sum(-1).double()
    acc[4] /= batch * lq
    return acc


def layer_curves(info: MethodInfo, layer: LayerInputs, grads: Sequence[torch.Tensor],
                 settings: Sequence[Mapping[str, Any]], form: str = "fisher", varied: str | None = None
                 ) -> LayerCurves:
    """The method's per-head density and sensitivity-weighted errors on the layer's recorded prompts, for
    each option setting in `settings` (complete option dicts; a per-head option may take one value per
    head). `grads[i]`: prompt i's `[B, Hq, L, D]` gradient of the loss with respect to the layer's
    attention output. `varied`: the one option the settings differ in; when the method's estimate ignores
    it, each prompt's block scores are estimated once."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if len(grads) != len(layer.query):
        raise ValueError(f"layer {layer.layer}: {len(grads)} gradients for {len(layer.query)} recorded prompts")
    hq = layer.query[0].shape[1]
    n = len(layer.query)
    density = torch.zeros(len(settings), hq, dtype=torch.float64)
    sums = torch.zeros(6, len(settings), hq, dtype=torch.float64)
    grad_elements = 0
    rel = torch.zeros(len(settings), hq, dtype=torch.float64)
    reuse = varied is not None and reuses_estimate(info, varied)
    for i in range(n):
        kept = []
        cache: EstimateCache | None = {} if reuse else None
        for j, options in enumerate(settings):
            x, den = kept_by(info, options, layer, i, cache)
            kept.append(x)
            density[j] += den
        terms = _prompt_terms(layer, i, grads[i], kept, form).cpu()
        sums += terms
        rel += (terms[2] / terms[3].clamp(min=1e-30)).sqrt()
        grad_elements += grads[i].shape[0] * grads[i].shape[2] * grads[i].shape[3]
    return LayerCurves(layer.layer, density / n, sums[0] / n, sums[1] / n, rel / n, sums[4] / n, sums[2] / n,
                       sums[5, 0] / max(grad_elements, 1))
