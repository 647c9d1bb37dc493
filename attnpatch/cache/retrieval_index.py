"""Nearest-neighbour indexes over offloaded keys for RetrievalAttention, one per (row, KV head),
built and searched batched over every row and head (no Python loop per head).

* `ExactIndex`: brute-force inner product (the MInference port's flat index).
* `IvfIndex`: inverted lists (CSR: members sorted by list, `offsets` per list), probed by the
  query's inner product with the lists' key centroids, built two ways:
  - `build_key_ivf`: plain IVF, k-means over the keys (each key in its nearest centroid's list) —
    the index the paper shows needs a large scan because decode queries are out of distribution.
  - `build_query_ivf` (attention-aware, from the prefill queries): the key IVF, then every training
    query's exact top-`links` keys (the query→key kNN links RetrievalAttention's RoarGraph-style
    index is built from) that the lists it would probe miss are added to its best list, so a decode
    query near a training query finds the keys that query attended. Differences from the paper:
    inverted lists instead of a navigable graph (a greedy graph walk is a pointer-chasing loop torch
    cannot batch), built from up to `n_train` prefill queries per query head. Measured on SmolLM2
    4K passkey keys (layers 3/10/20/28, 40 late queries, top-128, 32-key lists, 4 probed): recall
    0.40–0.55 at 3–5 % of keys scanned for the key IVF, 0.54–0.63 at 5–10 % (links 4) and
    0.60–0.78 at 10–19 % (links 16) for the attention-aware lists; at an equal scanned share the two
    are within a few points (key IVF with 8 probes: 0.63–0.78 at 7–10 %). So on these 4K keys the
    repaired lists raise recall at a fixed `n_probe` but do not yet beat plain IVF per key scanned;
    the paper's graph index is the next step (bench: bench/scripts/retrieval_fidelity.py).

Searches return the retrieved key indices, their raw scores `q·k` (-inf where nothing valid was
found) and the number of keys scanned. Padding keys (`valid` False) are never returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHUNK = 1 << 22  # elements of a score matrix computed at once while building


@dataclass
class SearchResult:
    """`indices` `[B, Hq, K]` into the offloaded keys, `scores` `[B, Hq, K]` (raw `q·k`, -inf where the
    slot holds nothing), `scanned` `[B, Hq]` keys whose score was computed."""

    indices: torch.Tensor
    scores: torch.Tensor
    scanned: torch.Tensor


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    b, hq, d = q.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    return q.reshape(b, hkv, hq // hkv, d)


@dataclass
class ExactIndex:
    """Brute force: every valid offloaded key is scored."""

    keys: torch.Tensor  # [B, Hkv, N, D] float32
    valid: torch.Tensor  # [B, N] bool

    def search(self, q: torch.Tensor, k: int) -> SearchResult:
        """Top-`k` keys per query head; `q` `[B, Hq, D]` float32."""
        b, hkv, n, _ = self.keys.shape
        qg = _grouped(q, hkv)  # [B, Hkv, G, D]
        scores = torch.matmul(qg, self.keys.transpose(-1, -2))  # [B, Hkv, G, N]
        scores.masked_fill_(~self.valid.view(b, 1, 1, n), float("-inf"))
        k = min(k, n)
        top, idx = scores.topk(k, dim=-1) if k else (scores[..., :0], scores[..., :0].long())
        scanned = self.valid.sum(-1).view(b, 1).expand(b, q.shape[1])
        return SearchResult(idx.reshape(b, -1, k), top.reshape(b, -1, k), scanned)

    def nbytes(self) -> int:
        return 0  # the exact index is the keys themselves


@dataclass
class IvfIndex:
    """Inverted lists per (row, KV head): list `c` holds `members[..., offsets[c]:offsets[c+1]]`."""

    keys: torch.Tensor  # [B, Hkv, N, D] float32
    valid: torch.Tensor  # [B, N] bool
    centroids: torch.Tensor  # [B, Hkv, C, D] float32
    offsets: torch.Tensor  # [B, Hkv, C + 1] long
    members: torch.Tensor  # [B, Hkv, M] long, sorted by list
    route: str  # "l2": nearest centroids (query clusters); "ip": largest q·centroid (key clusters)
    n_probe: int

    def _probe(self, qg: torch.Tensor) -> torch.Tensor:
        """`[B, Hkv, G, P]` lists each query probes."""
        scores = torch.matmul(qg, self.centroids.transpose(-1, -2))  # [B, Hkv, G, C]
        if self.route == "l2":  # argmin |q - c|^2 = argmax 2 q·c - |c|^2
            scores = 2 * scores - self.centroids.pow(2).sum(-1).unsqueeze(-2)
        return scores.topk(min(self.n_probe, scores.shape[-1]), dim=-1).indices

    def search(self, q: torch.Tensor, k: int) -> SearchResult:
        """Top-`k` keys per query head among the members of its probed lists; `q` `[B, Hq, D]` float32."""
        b, hkv, n, d = self.keys.shape
        qg = _grouped(q, hkv)
        g = qg.shape[2]
        probes = self._probe(qg)  # [B, Hkv, G, P]
        offsets = self.offsets.unsqueeze(2).expand(b, hkv, g, self.offsets.shape[-1])
        starts = offsets.gather(-1, probes)
        sizes = offsets.gather(-1, probes + 1) - starts
        ends = sizes.cumsum(-1)  # [B, Hkv, G, P] end of each probed list in the candidate row
        total = ends[..., -1]
        width = int(total.max()) if total.numel() else 0
        if width == 0:
            empty = q.new_zeros(b, hkv * g, 0)
            return SearchResult(empty.long(), empty, torch.zeros(b, hkv * g, dtype=torch.long))
        slot = torch.arange(width, device=q.device).view(1, 1, 1, width)
        which = (slot.unsqueeze(-1) >= ends.unsqueeze(-2)).sum(-1).clamp_(max=probes.shape[-1] - 1)  # P is small
        pos = starts.gather(-1, which) + slot - (ends - sizes).gather(-1, which)
        filled = slot < total.unsqueeze(-1)
        members = self.members.unsqueeze(2).expand(b, hkv, g, self.members.shape[-1])
        cand = members.gather(-1, pos.clamp_(max=max(self.members.shape[-1] - 1, 0)))
        cand = torch.where(filled, cand, n).sort(dim=-1).values  # a key in several probed lists: once
        cand[..., 1:].masked_fill_(cand[..., 1:] == cand[..., :-1], n)
        live = cand < n
        safe = cand.clamp(max=n - 1)
        live &= self.valid.view(b, 1, 1, n).expand(b, hkv, g, n).gather(-1, safe)
        row = (torch.arange(b * hkv, device=q.device) * n).view(b, hkv, 1, 1)
        kg = self.keys.reshape(b * hkv * n, d).index_select(0, (row + safe).flatten()).view(b, hkv, g, width, d)
        scores = torch.einsum("bhgwd,bhgd->bhgw", kg, qg).masked_fill_(~live, float("-inf"))
        k = min(k, width)
        top, idx = scores.topk(k, dim=-1)
        found = safe.gather(-1, idx)
        return SearchResult(found.reshape(b, -1, k), top.reshape(b, -1, k), live.sum(-1).reshape(b, -1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.centroids, self.offsets, self.members))


def kmeans(x: torch.Tensor, weight: torch.Tensor, clusters: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means: `x` `[H, n, D]`, `weight` `[H, n]` bool (points that count).

    Deterministic start: `clusters` valid points evenly spaced in order. Returns centroids
    `[H, C, D]` and each point's cluster `[H, n]`; a cluster that loses every point keeps its centroid.
    """
    h, n, d = x.shape
    w = weight.to(x.dtype)
    rank = weight.long().cumsum(-1) - 1  # order of each valid point
    count = weight.sum(-1, keepdim=True).clamp(min=1)
    want = (torch.arange(clusters, device=x.device) * count // clusters)  # [H, C] ranks to start from
    first = torch.searchsorted(rank.contiguous(), want.contiguous()).clamp(max=n - 1)
    centroids = x.gather(1, first.unsqueeze(-1).expand(h, clusters, d)).clone()
    assign = torch.zeros(h, n, dtype=torch.long, device=x.device)
    for step in range(iters + 1):
        assign = _nearest(x, centroids, "l2")
        if step == iters:
            break
        sums = torch.zeros_like(centroids).scatter_add_(1, assign.unsqueeze(-1).expand(h, n, d), x * w.unsqueeze(-1))
        sizes = torch.zeros(h, clusters, dtype=x.dtype, device=x.device).scatter_add_(1, assign, w)
        centroids = torch.where(sizes.unsqueeze(-1) > 0, sums / sizes.clamp(min=1).unsqueeze(-1), centroids)
    return centroids, assign


def _nearest(x: torch.Tensor, centroids: torch.Tensor, route: str) -> torch.Tensor:
    """`[H, n]` best centroid of each point ("l2": nearest, "ip": largest inner product), in chunks."""
    h, n, _ = x.shape
    c = centroids.shape[1]
    norms = centroids.pow(2).sum(-1).unsqueeze(1)  # [H, 1, C]
    step = max(1, _CHUNK // max(h * c, 1))
    out = []
    for i in range(0, n, step):
        s = torch.matmul(x[:, i:i + step], centroids.transpose(-1, -2))
        out.append((2 * s - norms if route == "l2" else s).argmax(-1))
    return torch.cat(out, 1) if out else torch.zeros(h, 0, dtype=torch.long, device=x.device)


def _lists(codes: torch.Tensor, clusters: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR lists from `codes = cluster * n + key` (`clusters * n` marks nothing), duplicates dropped."""
    none = clusters * n
    codes = codes.sort(dim=-1).values
    codes[..., 1:].masked_fill_(codes[..., 1:] == codes[..., :-1], none)
    codes = codes.sort(dim=-1).values
    bounds = (torch.arange(clusters + 1, device=codes.device) * n).expand(*codes.shape[:-1], clusters + 1)
    offsets = torch.searchsorted(codes.contiguous(), bounds.contiguous())
    width = int(offsets[..., -1].max()) if offsets.numel() else 0
    return offsets, (codes[..., :max(width, 1)] % n)


def n_clusters(n_keys: int, cluster_size: int) -> int:
    """Lists of about `cluster_size` keys each (at least one)."""
    return max(1, -(-n_keys // cluster_size))


def build_key_ivf(keys: torch.Tensor, valid: torch.Tensor, cluster_size: int, n_probe: int, iters: int) -> IvfIndex:
    """Plain IVF: k-means over the valid keys of each (row, KV head); probed by inner product."""
    b, hkv, n, d = keys.shape
    c = n_clusters(n, cluster_size)
    flat = keys.reshape(b * hkv, n, d)
    weight = valid.unsqueeze(1).expand(b, hkv, n).reshape(b * hkv, n)
    centroids, assign = kmeans(flat, weight, c, iters)
    codes = torch.where(weight, assign * n + torch.arange(n, device=keys.device), c * n)
    offsets, members = _lists(codes, c, n)
    return IvfIndex(keys, valid, centroids.view(b, hkv, c, d), offsets.view(b, hkv, -1),
                    members.view(b, hkv, -1), "ip", n_probe)


def build_query_ivf(keys: torch.Tensor, valid: torch.Tensor, queries: torch.Tensor, query_valid: torch.Tensor,
                    cluster_size: int, n_probe: int, iters: int, links: int) -> IvfIndex:
    """Attention-aware IVF (module docstring): `queries` `[B, Hq, nq, D]` post-RoPE prefill queries,
    `query_valid` `[B, nq]` (False for padding positions)."""
    base = build_key_ivf(keys, valid, cluster_size, n_probe, iters)
    b, hkv, n, d = keys.shape
    hq, nq = queries.shape[1], queries.shape[2]
    g = hq // hkv
    c = base.centroids.shape[2]
    flat_keys = keys.reshape(b * hkv, n, d)
    key_ok = valid.unsqueeze(1).expand(b, hkv, n).reshape(b * hkv, n)
    centroids = base.centroids.reshape(b * hkv, c, d)
    qx = queries.reshape(b * hkv, g * nq, d)
    qw = query_valid.view(b, 1, 1, nq).expand(b, hkv, g, nq).reshape(b * hkv, g * nq)
    home = _nearest(flat_keys, centroids, "l2")  # each key's list in the key IVF
    codes = [torch.where(key_ok, home * n + torch.arange(n, device=keys.device), c * n)]
    links, probe = min(links, n), min(n_probe, c)
    step = max(1, _CHUNK // max(b * hkv * n, 1))
    for i in range(0, g * nq, step):
        qs = qx[:, i:i + step]
        s = torch.matmul(qs, flat_keys.transpose(-1, -2)).masked_fill_(~key_ok.unsqueeze(1), float("-inf"))
        top, idx = s.topk(links, dim=-1)  # the training query's true top keys
        lists = torch.matmul(qs, centroids.transpose(-1, -2)).topk(probe, dim=-1).indices  # what it would probe
        seen = (home.gather(1, idx.flatten(1)).view_as(idx).unsqueeze(-1) == lists.unsqueeze(-2)).any(-1)
        missed = torch.isfinite(top) & ~seen & qw[:, i:i + step].unsqueeze(-1)
        codes.append(torch.where(missed, lists[..., :1] * n + idx, c * n).flatten(1))  # into its best list
    offsets, members = _lists(torch.cat(codes, 1), c, n)
    return IvfIndex(keys, valid, base.centroids, offsets.view(b, hkv, -1), members.view(b, hkv, -1), "ip", n_probe)


def recall(found: SearchResult, exact: SearchResult) -> torch.Tensor:
    """`[B, Hq]` share of the exact top-k (its valid entries) that `found` retrieved."""
    want = torch.isfinite(exact.scores)
    hit = (exact.indices.unsqueeze(-1) == found.indices.unsqueeze(-2)) & torch.isfinite(found.scores).unsqueeze(-2)
    got = (hit.any(-1) & want).sum(-1).float()
    return got / want.sum(-1).clamp(min=1).float()
