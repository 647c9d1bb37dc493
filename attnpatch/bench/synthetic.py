"""Synthetic Q/K/V with planted attention structure, for timing methods at lengths no real prompt
reaches here (random Q/K give near-uniform attention, which no method is built for).

`planted_qkv` draws Gaussian Q/K/V and plants, per KV head (shared by its query heads):

* **sinks**: the first `sinks` keys get a large component along a direction every query shares;
* **local band**: Q and K share a slowly rotating positional component, so a query scores keys within
  about `band` tokens of it higher (a smooth band along the diagonal);
* **vertical stripes**: `stripes` random key positions also get the shared direction (half the sink's
  strength): columns every query attends to;
* **slashes**: for `slashes` offsets `o`, query `i` and key `i - o` share a random component, so the
  diagonal at offset `o` stands out;
* **needles**: `needles` random (query, key) pairs far apart share a strong random component.

Planted components have norm `s = sqrt(strength · sqrt(d))`, so a planted q·k product of `s²` is a
scaled logit of `strength` whatever the head dim: sinks +strength, stripes +strength/2, the band up
to +strength at distance 0 (cosine fall-off), slashes ≈ +strength/2, needles +4·strength, against
Gaussian noise of scaled-logit standard deviation 1.
Everything is generated chunk by chunk on the target device: memory O(L·d).
"""

from __future__ import annotations

import math

import torch


def planted_qkv(batch: int, hq: int, hkv: int, length: int, d: int, *, seed: int = 0, device="cuda",
                dtype=torch.bfloat16, sinks: int = 4, band: int = 256, stripes: int = 16, slashes: int = 4,
                needles: int = 8, strength: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(q [B, Hq, L, d], k [B, Hkv, L, d], v [B, Hkv, L, d])` with the structure of the module docstring."""
    g = torch.Generator(device=device).manual_seed(seed)
    group = hq // hkv
    scale = math.sqrt(strength * math.sqrt(d))  # a planted product scale² is a scaled logit of `strength`
    q = torch.randn(batch, hq, length, d, generator=g, device=device)
    k = torch.randn(batch, hkv, length, d, generator=g, device=device)
    v = torch.randn(batch, hkv, length, d, generator=g, device=device)
    shared = torch.nn.functional.normalize(torch.randn(batch, hkv, 1, d, generator=g, device=device), dim=-1)
    qv = q.view(batch, hkv, group, length, d)
    qv += 0.5 * scale * shared.unsqueeze(2)
    k[:, :, :sinks] += 2.0 * scale * shared
    cols = torch.randint(sinks, max(sinks + 1, length), (stripes,), generator=g, device=device)
    k[:, :, cols] += scale * shared
    # local band: a positional code rotating once every ~4·band tokens in a random 2-D subspace
    pos = torch.arange(length, device=device, dtype=torch.float32)
    angle = pos * (2 * math.pi / (4 * band))
    basis = torch.nn.functional.normalize(torch.randn(2, d, generator=g, device=device), dim=-1)
    code = (torch.cos(angle)[:, None] * basis[0] + torch.sin(angle)[:, None] * basis[1]) * scale
    k += code
    qv += code.view(1, 1, 1, length, d)
    for _ in range(slashes):
        o = int(torch.randint(band, max(band + 1, length // 2), (1,), generator=g, device=device))
        c = torch.nn.functional.normalize(torch.randn(length, d, generator=g, device=device), dim=-1) * scale
        k[:, :, : length - o] += 0.7 * c[: length - o]
        qv[:, :, :, o:] += 0.7 * c[: length - o].view(1, 1, 1, length - o, d)
    for _ in range(needles):
        i = int(torch.randint(length // 2, length, (1,), generator=g, device=device))
        j = int(torch.randint(0, max(1, i // 2), (1,), generator=g, device=device))
        c = torch.nn.functional.normalize(torch.randn(d, generator=g, device=device), dim=-1) * 2 * scale
        k[:, :, j] += c
        qv[:, :, :, i] += c
    return q.to(dtype), k.to(dtype), v.to(dtype)
