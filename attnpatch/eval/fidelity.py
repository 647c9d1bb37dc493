"""Fidelity without tasks: on a real forward pass, per layer and head, how much of the true softmax
mass the selection keeps (attention recall), the output's relative error against dense attention on
the same Q/K/V, and the density. Operator level (methods.md §0.6): each layer is measured on the
inputs it really received from the patched model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from attnpatch.api import patch_model
from attnpatch.backends.reference import block_sparse_attention, token_gather_attention
from attnpatch.sparsity import BlockSelection, KeyBounds, TokenSelection, num_blocks
from attnpatch.spec import PatchSpec

_ROW_CHUNK = 1024


@dataclass
class HeadFidelity:
    layer: int
    head: int
    density: float  # computed block pairs / causal block pairs (after skips)
    recall: float  # mean over query rows of the true softmax mass inside the computed blocks
    rel_error: float  # ‖out − dense‖ / ‖dense‖ for this head


@dataclass
class LayerRecord:
    """What `inspect` keeps for plotting one layer: the computed blocks and the true block mass."""

    layer: int
    computed: torch.Tensor  # bool [H, R, C] (batch 0)
    mass: torch.Tensor  # float [H, R, C]: mean true softmax mass per row, per block pair


def exact_attention(query, key, value, scale, mask=None) -> torch.Tensor:
    """Dense attention in float32: causal when `mask` is None (then queries and keys must be as many),
    else under the boolean `mask` `[B, 1|H, Lq, Lk]`."""
    if mask is None and query.shape[2] != key.shape[2]:
        raise ValueError("chunked prefill without a mask is not measured")
    return F.scaled_dot_product_attention(query.float(), key.float(), value.float(), scale=scale, enable_gqa=True,
                                          attn_mask=mask, is_causal=mask is None)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`[B, H]`: ‖out − ref‖ / ‖ref‖ per batch row and head (outputs `[B, H, L, D]`)."""
    return (out.float() - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1).clamp(min=1e-30)


def true_block_mass(query, key, scale, block_q, block_k, mask=None) -> torch.Tensor:
    """`[B, Hq, R, C]`: for each query block, the average (over its rows) true softmax mass of each key
    block, computed in row chunks (never more than `_ROW_CHUNK × Lk` scores per head at once)."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    r, c = num_blocks(lq, block_q), num_blocks(lk, block_k)
    out = torch.zeros(b, hq, r, c, dtype=torch.float32, device=query.device)
    kpos = torch.arange(lk, device=query.device)
    kf = key.float().repeat_interleave(g, 1)
    for r0 in range(0, lq, _ROW_CHUNK):
        r1 = min(lq, r0 + _ROW_CHUNK)
        s = torch.matmul(query[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale  # [B,H,rows,Lk]
        qpos = torch.arange(r0, r1, device=query.device) + (lk - lq)
        allowed = kpos[None, :] <= qpos[:, None]
        if mask is not None:
            allowed = allowed & mask[:, :, r0:r1]
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        p = F.pad(p, (0, c * block_k - lk)).view(b, hq, r1 - r0, c, block_k).sum(-1)  # [B,H,rows,C]
        rows_block = torch.arange(r0, r1, device=query.device) // block_q
        out.index_add_(2, rows_block, p)
    counts = torch.bincount(torch.arange(lq, device=query.device) // block_q, minlength=r).clamp(min=1)
    return out / counts.view(1, 1, r, 1)


def computed_block_mask(selection: BlockSelection, skipped: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean `[B, H, R, C]`: the selection's blocks less the slots `skipped` (`[B, H, R, K]`, from an
    executor's `skipped_out`) marks as skipped at run time (BLASST)."""
    computed = selection.to_block_mask()
    if skipped is not None:
        c = computed.shape[-1]
        idx = torch.where(skipped, selection.indices.long(), c)
        drop = torch.zeros(*computed.shape[:-1], c + 1, dtype=torch.bool, device=computed.device)
        drop.scatter_(-1, idx, True)
        computed = computed & ~drop[..., :c]
    return computed


def listed_key_mask(selection: TokenSelection) -> torch.Tensor:
    """Boolean `[B, H, R, Lk]`: the keys a token selection lists for each query block."""
    b, hq, r, kmax = selection.indices.shape
    lk = selection.kv_len
    listed = torch.arange(kmax, device=selection.indices.device) < selection.counts.unsqueeze(-1)
    chosen = torch.zeros(b, hq, r, lk + 1, dtype=torch.bool, device=selection.indices.device)
    chosen.scatter_(-1, torch.where(listed, selection.indices.long(), lk), True)
    return chosen[..., :lk]


def layer_fidelity(layer, query, key, value, selection: BlockSelection, mask, scale):
    """Per-head fidelity of one sparse call, plus the computed-block and true-mass maps of batch 0."""
    b, hq, lq, _ = query.shape
    skipped = None
    if selection.skip is not None:
        skipped = torch.zeros(selection.indices.shape, dtype=torch.bool, device=query.device)
    sparse = block_sparse_attention(query.float(), key.float(), value.float(), selection, scale=scale, mask=mask,
                                    skipped_out=skipped)
    dense = exact_attention(query, key, value, scale, mask)
    computed = computed_block_mask(selection, skipped)
    mass = true_block_mass(query, key, scale, selection.block_q, selection.block_k, mask)
    rows = torch.bincount(torch.arange(lq, device=query.device) // selection.block_q,
                          minlength=computed.shape[2]).float()
    recall = ((mass * computed).sum(-1) * rows).sum(-1) / lq  # [B, H]
    total = selection.causal_pairs().sum().float()
    density = computed.sum((-1, -2)).float() / total
    err = relative_error(sparse, dense)
    heads = [HeadFidelity(layer, h, float(density[:, h].mean()), float(recall[:, h].mean()), float(err[:, h].mean()))
             for h in range(hq)]
    return heads, LayerRecord(layer, computed[0].cpu(), mass[0].cpu())


def true_token_recall(query, key, scale, selection: TokenSelection, mask=None) -> torch.Tensor:
    """`[B, Hq]`: the mean over query rows of the true softmax mass on the keys listed for the row's
    query block (row chunks of `_ROW_CHUNK × Lk` scores per head, as `true_block_mass`)."""
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    chosen = listed_key_mask(selection)
    kf = key.float().repeat_interleave(hq // hkv, 1)
    kpos = torch.arange(lk, device=query.device)
    total = torch.zeros(b, hq, dtype=torch.float64, device=query.device)
    for r0 in range(0, lq, _ROW_CHUNK):
        r1 = min(lq, r0 + _ROW_CHUNK)
        s = torch.matmul(query[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        qpos = torch.arange(r0, r1, device=query.device) + (lk - lq)
        allowed = kpos[None, :] <= qpos[:, None]
        if mask is not None:
            allowed = allowed & mask[:, :, r0:r1]
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        rows_chosen = chosen[:, :, torch.arange(r0, r1, device=query.device) // selection.block_q]
        total += (p * rows_chosen).sum((-1, -2), dtype=torch.float64)
    return (total / lq).float()


def token_layer_fidelity(layer, query, key, value, selection: TokenSelection, bounds: KeyBounds, mask, scale):
    """Per-head fidelity of one token-granularity call (recall over the listed keys, output error of
    the gathered attention, exact (query, key) pair density); no block maps."""
    hq = query.shape[1]
    sparse = token_gather_attention(query.float(), key.float(), value.float(), selection, scale=scale, bounds=bounds)
    dense = exact_attention(query, key, value, scale, mask)
    recall = true_token_recall(query, key, scale, selection, mask)
    kept, total = selection.kept_and_total()
    density = (kept / total).float()
    err = relative_error(sparse, dense)
    return [HeadFidelity(layer, h, float(density[h]), float(recall[:, h].mean()), float(err[:, h].mean()))
            for h in range(hq)]


@dataclass
class FidelityReport:
    model: str
    method: str
    options: dict
    tokens: int
    heads: list[HeadFidelity] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        n = max(len(self.heads), 1)
        return {"density": sum(h.density for h in self.heads) / n, "recall": sum(h.recall for h in self.heads) / n,
                "rel_error": sum(h.rel_error for h in self.heads) / n}

    def to_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "options": self.options, "tokens": self.tokens,
                "summary": self.summary(), "dense_layers": self.dense_layers, "heads": [asdict(h) for h in self.heads]}


@torch.no_grad()
def measure(model, input_ids, method: str | PatchSpec, keep_layers=(), model_name: str = "", **options):
    """Run one prefill with `method` (a name with `options`, a "name:k=v" string or a PatchSpec) on the
    reference backend and measure every sparse layer (block or token selections); returns (report,
    {layer: LayerRecord}; block selections only)."""
    spec = method if isinstance(method, PatchSpec) else PatchSpec.build(method, **options)
    spec = dataclasses.replace(spec, backend="reference")
    report = FidelityReport(model_name, spec.method, dict(spec.prefill_options), int(input_ids.shape[1]))
    records: dict[int, LayerRecord] = {}

    def observe(call):
        if call.phase != "prefill" or not isinstance(call.selection, BlockSelection | TokenSelection):
            return
        b, _, lq, _ = call.query.shape
        mask = None if call.bounds.is_plain else call.bounds.dense_mask(b, lq, call.key.shape[2], call.query.device)
        if isinstance(call.selection, TokenSelection):
            report.heads.extend(token_layer_fidelity(call.layer, call.query, call.key, call.value, call.selection,
                                                     call.bounds, mask, call.scale))
            return
        heads, record = layer_fidelity(call.layer, call.query, call.key, call.value, call.selection, mask, call.scale)
        report.heads.extend(heads)
        if call.layer in keep_layers:
            records[call.layer] = record

    with patch_model(model, spec) as patch:
        patch.observe(observe)
        model.get_decoder()(input_ids=input_ids.to(model.device), use_cache=False)  # no LM head: not measured
        stats = patch.stats()
    report.dense_layers = [d["layer"] for d in stats.layers if d["dense_fallbacks"]]
    return report, records


def plot_layers(records: dict[int, LayerRecord], heads, path) -> None:
    """Heat maps: true block mass (log scale) with the computed blocks outlined, one panel per (layer, head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(layer, h) for layer in sorted(records) for h in heads]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (layer, h) in zip(axes.flat, panels, strict=False):
        rec = records[layer]
        mass = rec.mass[h].clamp(min=1e-6).log10().numpy()
        ax.imshow(mass, cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
        ax.contour(rec.computed[h].float().numpy(), levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(f"layer {layer} head {h}", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("true attention mass per block (log10), computed blocks outlined", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
