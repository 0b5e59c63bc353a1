"""Shortcut splitting (Q-Diffusion): a Conv2d whose input is ``concat(hidden, skip)`` as two convs over the slices.

In a UNet's up blocks the first conv (and the 1x1 shortcut conv) of a resnet reads the concatenation of the hidden
state and a skip connection from the down path; the two slices have very different ranges, so one quantization
scale per output channel fits neither. Convolution is linear in its input channels, so::

    conv(concat(h, s), W, b) = conv(h, W[:, :split], b) + conv(s, W[:, split:])

:class:`SplitConv2d` computes exactly that with two child modules ``hidden`` and ``skip``. Quantized, the children
are two ordinary :class:`~tuneqdm.quant.layers.QConv2d` with their own integers, zero-points and scales, so the
quantized-base format, the trainable scales, adapters and routing are unchanged: a split conv is simply two
quantized layers named ``<conv>.hidden`` and ``<conv>.skip`` (``quantization.json`` lists the splits so that
``load_quantized`` rebuilds the same modules).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TuneQDMError


class SplitConv2d(nn.Module):
    """``conv(x[:, :split]) + conv(x[:, split:])``; the bias lives in ``hidden`` only."""

    def __init__(self, hidden: nn.Module, skip: nn.Module, split: int):
        super().__init__()
        self.hidden, self.skip, self.split = hidden, skip, int(split)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, split: int, device=None) -> SplitConv2d:
        """Split a float conv at input channel ``split`` (weights copied unless the conv is on the meta device)."""
        if conv.groups != 1 or not 0 < split < conv.in_channels:
            raise TuneQDMError(f"cannot split a conv of {conv.in_channels} input channels (groups {conv.groups}) "
                               f"at channel {split}")
        device = conv.weight.device if device is None else device
        parts = []
        for lo, hi, bias in ((0, split, conv.bias is not None), (split, conv.in_channels, False)):
            part = nn.Conv2d(hi - lo, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                             1, bias, conv.padding_mode, device=device, dtype=conv.weight.dtype)
            if not conv.weight.is_meta and device != torch.device("meta"):
                with torch.no_grad():
                    part.weight.copy_(conv.weight[:, lo:hi])
                    if bias:
                        part.bias.copy_(conv.bias)
            parts.append(part)
        return cls(parts[0], parts[1], split)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x[:, : self.split]) + self.skip(x[:, self.split :])

    def extra_repr(self) -> str:
        return f"split={self.split}"


def split_convs(model: nn.Module) -> dict[str, int]:
    """``{module name: split channel}`` of every :class:`SplitConv2d` in ``model``."""
    return {name: m.split for name, m in model.named_modules() if isinstance(m, SplitConv2d)}
