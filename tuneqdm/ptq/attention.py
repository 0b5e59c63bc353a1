"""Quantized attention probabilities, as a diffusers attention processor (``unet.set_attn_processor``).

DGQ's observation: cross-attention gives the ``<start>`` token (key 0) a large share of every query's probability,
so one range for all keys leaves the words' probabilities a handful of levels. DGQ therefore

- keeps the ``<start>`` token's probability (key index 0 of cross-attention) in full precision;
- quantizes every other probability with a logarithmic quantizer whose scale δ is dynamic and prompt-specific: the
  maximum over the sample's non-``<start>`` probabilities (all heads and queries of that prompt), computed on the fly.

Two logarithmic quantizers, both ``p̂ = δ · 2^(−q·r)`` with code ``q = round(−log2(p / δ) / r)`` in [0, 2^b − 1]
and codes past the last level flushed to 0:

- ``mode="log2"``, the paper's: one level per octave (``r = 1``). Its 2^b levels reach far below anything that
  matters (δ·2^−255 at 8 bits) while a probability between two powers of two is off by up to 41 %.
- ``mode="log"``, the default: the same quantizer with its 2^b levels spread over the 16 octaves below δ
  (``r = 16 / (2^b − 1)``: 16 levels per octave at 8 bits, 4 at 6 bits); smaller probabilities become 0.
  On the toy model this makes attention quantization nearly lossless (one-step SQNR at
  W8A8, K = 16: 36.70 dB, against 36.73 dB with float attention and 33.16 dB with ``log2``); 8 to 32 octaves all
  measure within 0.1 dB (docs/benchmarks/ptq_activations.md).

Self-attention has no ``<start>`` key: all its probabilities use the log quantizer with the sample's maximum.
The baseline (``mode="uniform"``) quantizes every probability uniformly on [0, 1] (scale ``1 / (2^b − 1)``, zero
point 0). With ``bits=None`` (or the owning quantizer disabled) the processor computes exactly diffusers'
``AttnProcessor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import TuneQDMError
from .config import check_activation_bits

MODES = ("log", "log2", "uniform")
LOG_OCTAVES = 16  # octaves below the prompt's scale covered by mode="log"


def log_quantize(p: torch.Tensor, delta: torch.Tensor, bits: int, octaves: float | None = LOG_OCTAVES) -> torch.Tensor:
    """``δ · 2^(−q·r)``, ``q = round(−log2(p / δ) / r)``, ``r = octaves / (2^b − 1)``; codes past 2^b − 1 flush to 0.
    ``octaves=None`` is the plain log2 quantizer (``r = 1``). Exact on the levels ``δ · 2^(−k·r)``."""
    levels = 2**bits - 1
    step = 1.0 if octaves is None else octaves / levels
    delta = delta.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(-torch.log2(p.float() / delta) / step).clamp_min(0)
    return torch.where(q > levels, 0.0, delta * torch.exp2(-q * step)).to(p.dtype)


def uniform_quantize(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform quantization of probabilities on [0, 1]: ``round(p · (2^b − 1)) / (2^b − 1)``."""
    levels = 2**bits - 1
    return (torch.round(p.float() * levels).clamp(0, levels) / levels).to(p.dtype)


def quantize_probabilities(probs: torch.Tensor, bits: int, mode: str, batch_size: int, keep_start: bool,
                           start: int = 0):
    """Quantize attention probabilities ``(batch·heads, queries, keys)`` (diffusers' ``head_to_batch_dim`` layout:
    sample-major; ``(batch, heads, queries, keys)`` alike) in ``mode`` "log", "log2" or "uniform". ``keep_start``:
    key ``start`` (the prompt's ``<start>`` token) stays in full precision and is left out of the log scale."""
    if mode == "uniform":
        return uniform_quantize(probs, bits)
    per_sample = probs.reshape(batch_size, -1, probs.shape[-1])
    is_start = torch.zeros(probs.shape[-1], dtype=torch.bool, device=probs.device)
    if keep_start:
        is_start[start] = True
    delta = per_sample.masked_fill(is_start, 0).amax(dim=(1, 2), keepdim=True)  # one dynamic scale per prompt
    quantized = log_quantize(per_sample, delta, bits, LOG_OCTAVES if mode == "log" else None)
    return torch.where(is_start, per_sample, quantized).reshape(probs.shape)


class QuantizedAttnProcessor:
    """diffusers' ``AttnProcessor`` computation with the attention probabilities quantized (see the module doc)."""

    def __init__(self, bits: int | None = 8, mode: str = "log", owner=None):
        if mode not in MODES:
            raise TuneQDMError(f"attention quantization {mode!r} is unknown: choose log, log2 or uniform")
        self.bits = None if bits is None else check_activation_bits(bits)
        self.mode = mode
        self.owner = owner  # an ActivationQuantizer whose ``enabled`` switches this processor too

    @property
    def active(self) -> bool:
        return self.bits is not None and (self.owner is None or self.owner.enabled)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if cross else hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)

        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.active:
            probs = quantize_probabilities(probs, self.bits, self.mode, batch_size, keep_start=cross)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class WrappedAttnProcessor:
    """Any diffusers attention processor (Flux's, SD3's joint, PixArt's ``AttnProcessor2_0``) with its attention
    probabilities quantized: the processor runs unchanged, and its call of ``scaled_dot_product_attention`` is
    computed as ``softmax(q kᵀ · scale + mask)`` quantized (see ``quantize_probabilities``) times ``v``, through a
    ``torch.overrides.TorchFunctionMode`` active only during the call.

    ``<start>``: kept exact where the prompt's keys begin with CLIP's ``<start>`` (``start_token``): the first text
    key, which follows the image keys in SD3's joint attention (``text_last``). T5 prompts (Flux, PixArt) have no start
    token: every probability is log-quantized with the sample's maximum. A processor that never calls
    ``scaled_dot_product_attention`` is left in full precision, and the owner records it (``skipped``)."""

    def __init__(self, inner, name: str, bits: int | None = 8, mode: str = "log", owner=None, start_token=False,
                 text_last=False):
        self.inner, self.name, self.start_token, self.text_last = inner, name, start_token, text_last
        self.quantizer = QuantizedAttnProcessor(bits, mode, owner)
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if not self.quantizer.active:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        start = None
        if self.start_token and encoder_hidden_states is not None:
            start = hidden_states.shape[1] if self.text_last else 0
        mode = _QuantizedSDPA(self.quantizer, start)
        with mode:
            out = self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if not mode.used and self.owner is not None:
            self.owner.skipped_attention.add(f"{self.name} ({type(self.inner).__name__})")
        return out


class _QuantizedSDPA(TorchFunctionMode):
    """``scaled_dot_product_attention`` with quantized probabilities; every other function runs as it is."""

    def __init__(self, quantizer: QuantizedAttnProcessor, start: int | None):
        super().__init__()
        self.quantizer, self.start, self.used = quantizer, start, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.used = True
        return self.attend(*args, **kwargs)

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        if dropout_p or enable_gqa:
            raise TuneQDMError("quantized attention supports neither attention dropout nor grouped-query attention")
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        scores = (query @ key.transpose(-2, -1)) * scale
        if is_causal:
            attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        probs = scores.softmax(dim=-1)
        q = self.quantizer
        probs = quantize_probabilities(probs, q.bits, q.mode, probs.shape[0], self.start is not None,
                                       self.start or 0)
        return probs @ value
