"""`InfiniRetriLayer`: a cache layer that, between chunks of a long input, keeps only the tokens the
model's own attention retrieves, at compacted RoPE positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer


def rerotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Post-RoPE keys `[B, H, R, D]` moved by `delta` positions (`[B, R]`): RoPE is a rotation per
    frequency pair, so `R(p + δ) k = R(δ) R(p) k` (any attention scaling stays as it was). The first
    `2 · len(inv_freq)` dims rotate (transformers' rotate-half layout), the rest pass through."""
    rd = 2 * inv_freq.shape[0]
    angle = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(keys.device, torch.float32)  # [B, R, rd/2]
    emb = torch.cat([angle, angle], -1).unsqueeze(1)  # [B, 1, R, rd]
    k = keys[..., :rd].float()
    half = rd // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], -1)
    out = (k * emb.cos() + rotated * emb.sin()).to(keys.dtype)
    return torch.cat([out, keys[..., rd:]], -1) if rd < keys.shape[-1] else out


class InfiniRetriLayer(DynamicLayer):
    """A `DynamicLayer` (everything is stored and positions are the cache's own) that `compress`
    reduces to chosen tokens, re-rotating their keys to positions `0..R-1` so that the next chunk,
    fed at positions `R, R+1, …` (transformers takes them from the cache length), sees them as a
    contiguous prefix. The layer that scores (`scores_here`) records, when asked by the reader
    (`score_queries` set), the attention of the call's last `score_queries` queries onto every key:
    probabilities summed over query heads and scoring queries, smoothed along the keys by a box
    convolution of width `phrase` (so whole phrases score together), `[B, L]`.
    """

    is_sliding = False

    def __init__(self, scores_here: bool, phrase: int):
        super().__init__()
        self.scores_here, self.phrase = scores_here, phrase
        self.score_queries = 0  # set by the reader before a forward whose attention should be scored
        self.scores: torch.Tensor | None = None

    def record_scores(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """Score every key of this call by the attention of the last `score_queries` queries."""
        n = min(self.score_queries, query.shape[2])
        if not (self.scores_here and n):
            return
        b, hq, lq, d = query.shape
        hkv, lk = key.shape[1], key.shape[2]
        q = query[:, :, lq - n:].float().reshape(b, hkv, hq // hkv * n, d)
        s = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [B, Hkv, G*n, Lk]
        qpos = (lk - n + torch.arange(n, device=key.device)).repeat(hq // hkv)
        s = s.masked_fill(torch.arange(lk, device=key.device) > qpos.view(-1, 1), float("-inf"))
        mass = torch.softmax(s, -1).sum((1, 2))  # [B, Lk]
        w = self.phrase
        kernel = torch.ones(1, 1, w, device=key.device)
        self.scores = F.conv1d(F.pad(mass.unsqueeze(1), ((w - 1) // 2, w // 2)), kernel).squeeze(1)

    def compress(self, keep: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """Keep the stored tokens at `keep` (`[B, R]`, ascending; the same count per row), moved to
        positions `0..R-1`."""
        b, r = keep.shape
        keep = keep.to(self.keys.device)
        index = keep.view(b, 1, r, 1)
        keys = self.keys.gather(2, index.expand(b, self.keys.shape[1], r, self.keys.shape[-1]))
        self.values = self.values.gather(2, index.expand(b, self.values.shape[1], r, self.values.shape[-1]))
        self.keys = rerotate(keys, torch.arange(r, device=keep.device) - keep, inv_freq)
        self.scores = None
