"""Per-channel sums of the quantized layers' backward (``Σ`` over every dimension but the channels), in float32 and
through a small reused buffer, so that the scale gradients add nothing activation-sized to the training peak."""

from __future__ import annotations

import torch

from .workspace import scratch


def channel_sum(a: torch.Tensor, channel_dim: int) -> torch.Tensor:
    channel_dim %= a.dim()
    dims = [d for d in range(a.dim()) if d != channel_dim]
    return a.sum(dim=dims, dtype=torch.float32) if dims else a.float()


_DOT_CHUNK = 1 << 20  # elements of the product buffer: small, so that it adds nothing to the training peak


def channel_dot(a: torch.Tensor, b: torch.Tensor, channel_dim: int, a_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ a ⊙ b`` over every dimension but ``channel_dim``, in float32, a chunk at a time through a small reused
    buffer (an activation-sized product would be fresh memory on every call). ``a`` may be int8 with ``a_scale``
    (broadcasting against it, constant along the channels): the dequantized ``a`` is never built whole."""
    channel_dim %= a.dim()
    channels = a.shape[channel_dim]
    a = a.reshape(-1, channels, a.shape[channel_dim + 1 :].numel())  # (P, C, Q)
    b = b.reshape(a.shape)
    dtype = b.dtype if a_scale is not None else a.dtype
    if a_scale is not None:
        a_scale = a_scale.reshape(a.shape[0], 1, -1).to(dtype)
    out = torch.empty(channels, dtype=torch.float32, device=a.device)
    if a.shape[2] > 1:  # channels in the middle (conv): chunk over channels
        step = max(1, _DOT_CHUNK // (a.shape[0] * a.shape[2]))
        for c in range(0, channels, step):
            ac, bc = a[:, c : c + step], b[:, c : c + step]
            prod = torch.mul(ac, bc, out=scratch("product", ac.numel(), dtype, a.device).view(ac.shape))
            if a_scale is not None:
                prod.mul_(a_scale)
            out[c : c + step] = prod.sum(dim=(0, 2), dtype=torch.float32)
    else:  # channels last (linear): chunk over rows
        step = max(1, _DOT_CHUNK // channels)
        out.zero_()
        for r in range(0, a.shape[0], step):
            ac, bc = a[r : r + step, :, 0], b[r : r + step, :, 0]
            prod = torch.mul(ac, bc, out=scratch("product", ac.numel(), dtype, a.device).view(ac.shape))
            if a_scale is not None:
                prod.mul_(a_scale[r : r + step, :, 0])
            out += prod.sum(dim=0, dtype=torch.float32)
    return out
