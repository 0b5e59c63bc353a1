"""The denoiser, built the lean way for what a command does with it.

- quantized (every scale method, qlora, sampling an adapter): packed integers streamed straight from the model's
  safetensors, tensor by tensor, on the device that will run it (``tuning.streaming.quantize_pretrained``), or the
  same integers read back from the cache of quantized bases; never a float model.
- float and streamed (class images for prior preservation, calibration data): each module's float weights read from
  the files as it runs (``tuneqdm.loading.streamed``), so the float model is never held.
- float and resident (the ``fp`` and ``lora`` baselines, sampling the float base itself): loaded whole in the compute
  dtype, which is what those ask for.
"""

from __future__ import annotations

import torch
from torch import nn

from ..denoisers import attribute_word
from ..progress import progress, stage
from ..tuning.config import QuantConfig
from ..tuning.model import quant_state
from ..tuning.streaming import quantize_pretrained
from .cache import QuantizedCache
from .components import resident, skeleton, streamed
from .source import Source


def quantized_denoiser(source: Source, config: QuantConfig, device="cpu", cache: QuantizedCache | bool | None = None,
                       splits: dict[str, int] | None = None, store: bool = True) -> nn.Module:
    """The source's denoiser as packed integers of ``config.bits``/``config.init`` (its original scales, ``config``
    attached): from the cache when it holds them, else streamed from the files (and then cached unless ``store`` is
    False: e.g. on the non-main processes of a distributed run). ``cache``: see ``QuantizedCache.of`` (None: the
    default folder; False: none)."""
    cache = QuantizedCache.of(cache)
    entry = cache.entry(cache.key(source, config, splits))
    if entry is not None and entry.is_dir():
        model = cache.load(entry, device)  # checked first: a damaged entry is one line, with nothing printed before
        progress(desc=f"the {attribute_word(source.denoiser)} quantized to {config.bits} bits ({config.init}) from the "
                      f"cache ({entry.name})", total=1, bar_format="{desc}").close()
        return model
    if entry is not None and store:
        cache.check_room(source, config)
    model = quantize_pretrained(source.component_folder(source.denoiser), config, variant=source.variant_of(source.denoiser),
                                device=device, splits=splits)
    quant_state(model).base_id = source.base_id
    if entry is not None and store:
        cache.store(model, entry, source)
    return model


def float_denoiser(source: Source, device="cpu", dtype: torch.dtype = torch.float32,
                   stream: bool = False) -> nn.Module:
    """The source's float denoiser, streamed module by module or resident (see the module docstring)."""
    if stream:
        return streamed(source, source.denoiser, device, dtype)
    with stage(f"loading the float {attribute_word(source.denoiser)} of {source.title}"):
        return resident(source, source.denoiser, device, dtype)


def denoiser_skeleton(source: Source, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The denoiser on the meta device: its config, for the work that needs no weight (sizes, latent layout)."""
    return skeleton(source, source.denoiser, dtype)
