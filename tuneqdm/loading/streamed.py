"""Float models that never sit in memory whole: each module's weights are read from the checkpoint when it runs.

A text encoder runs once per prompt, a float denoiser once per step of a class image; holding a 4.76 B-parameter T5
in float32 for that costs 19 GB. A streamed model is built on the meta device from its config, and every module
that holds weights gets two PyTorch forward hooks: before it runs, its tensors are read from the model's own
safetensors files (``tuneqdm.shards.read_tensor``: one short mapping per tensor), cast to the compute dtype and put
on the execution device; after it ran they go back to the meta device. At most one module's float weights (e.g. one
4096x10240 Linear) are resident at a time. Between calls the model's first parameter is a one-value NaN placeholder on
the execution device rather than on the meta device: transformers and diffusers models report their device and dtype
from their first parameter, and pipelines create their tensors there. The numbers are those of the whole model loaded in the compute dtype: the same weights go
through the same operations. Like tuneqdm's other hooks, these leave ``forward`` and the module tree untouched.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import TuneQDMError
from ..shards import read_tensor, tensor_files

STREAMED_ATTR = "_tuneqdm_streamed"  # on a streamed model: the handles of its hooks
WEIGHTS_ATTR = "_tuneqdm_streamed_weights"  # on a streamed model: {module name: its _Weights}


def stored_names(model: nn.Module, files: dict[Path, list[str]], where) -> dict[str, str]:
    """``{parameter name: the name the files hold it under}`` for every parameter of ``model`` (tied ones share a
    tensor); one line for a parameter the files lack and for a tensor of the files the model does not have."""
    keys = set(tensor_files(files))
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    names = {}
    for group in groups.values():
        stored = [n for n in group if n in keys]
        if not stored:
            raise TuneQDMError(f"{where} lacks the weight {group[0]!r} of its config's model: download the model again")
        names.update(dict.fromkeys(group, stored[0]))
    buffers = {n for n, _ in model.named_buffers()}
    unknown = sorted(keys - set(names) - buffers)
    if unknown:
        raise TuneQDMError(f"{where} holds {unknown[0]!r}, which the model of its config does not have: the folder's "
                           "files do not match")
    return names


class _Weights:
    """One module's own parameters, read from the files before it runs and dropped after: to the meta device, or
    (``placeholders``: the model's first parameter) to a one-value NaN view of the right shape on the device."""

    def __init__(self, entries: list[tuple[str, Path, str]], device, dtype: torch.dtype, placeholders=(),
                 kept: nn.Parameter | None = None):
        self.entries, self.device, self.dtype = entries, torch.device(device), dtype
        self.placeholders, self.kept = set(placeholders), kept
        self.held = False  # while held (``held``), the weights stay: the hooks neither read nor drop them

    def load(self, module: nn.Module, args) -> None:
        if self.held:
            return
        for leaf, shard, key in self.entries:
            t = read_tensor(shard, key)
            setattr(module, leaf, nn.Parameter(t.to(self.device, self.dtype), requires_grad=False))

    def drop(self, module: nn.Module, args, output) -> None:
        if self.held:
            return
        for leaf, _, _ in self.entries:
            shape = getattr(module, leaf).shape
            setattr(module, leaf, self.kept if leaf in self.placeholders else
                    nn.Parameter(torch.empty(shape, dtype=self.dtype, device="meta"), requires_grad=False))


def placeholder(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor of ``shape`` on ``device`` holding one value, NaN (a stride-0 view): the device and dtype a model
    reports from its first parameter, at no memory, and loud if its values are ever read outside its module's call."""
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)


def stream(model: nn.Module, files: dict[Path, list[str]], device, dtype: torch.dtype, where) -> nn.Module:
    """``model`` (built on the meta device, in ``dtype``) made to run on ``device`` with each module's weights read
    from ``files`` as it runs; its buffers (small) are loaded now and stay. Between calls every parameter is on the
    meta device, but the first one, which is a one-value placeholder on ``device`` (see ``placeholder``)."""
    names = stored_names(model, files, where)
    shards = tensor_files(files)
    _load_buffers(model, shards, device, dtype, where)
    first = next(model.parameters(), None)
    kept = None if first is None else nn.Parameter(placeholder(first.shape, dtype, device), requires_grad=False)
    handles: list[RemovableHandle] = []
    every: dict[str, _Weights] = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        entries = [(leaf, shards[names[f"{prefix}.{leaf}" if prefix else leaf]],
                    names[f"{prefix}.{leaf}" if prefix else leaf]) for leaf, _ in own]
        firsts = [leaf for leaf, p in own if p is first]
        weights = _Weights(entries, device, dtype, firsts, kept)
        for leaf in firsts:  # tied: every module holding the first parameter holds the one placeholder
            setattr(module, leaf, kept)
        handles += [module.register_forward_pre_hook(weights.load), module.register_forward_hook(weights.drop)]
        every[prefix] = weights
    setattr(model, STREAMED_ATTR, handles)
    setattr(model, WEIGHTS_ATTR, every)
    return model.eval().requires_grad_(False)


def _load_buffers(model: nn.Module, shards: dict[str, Path], device, dtype: torch.dtype, where) -> None:
    """Buffers the files hold are read; the others (made by the constructor: position ids) are moved to ``device``."""
    with torch.no_grad():
        for name, buffer in list(model.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            value = read_tensor(shards[name], name, float_only=False) if name in shards else buffer
            if value.is_meta:
                raise TuneQDMError(f"{where} lacks the buffer {name!r} of its config's model: download the model again")
            setattr(model.get_submodule(owner), leaf, value.to(device, dtype if value.is_floating_point() else None))


def is_streamed(model) -> bool:
    return getattr(model, STREAMED_ATTR, None) is not None


@contextlib.contextmanager
def held(model: nn.Module, name: str):
    """The submodule ``name`` with its float weights resident while inside (read once, kept across calls), for work
    that needs one block's weights as ordinary parameters (AdaRound trains against them through
    ``torch.func.functional_call``); the rest of the model keeps streaming. A model that is not streamed holds all of
    its weights already: its submodule is given as it is."""
    module = model.get_submodule(name)
    mine = [(model.get_submodule(prefix), w) for prefix, w in (getattr(model, WEIGHTS_ATTR, None) or {}).items()
            if not name or prefix == name or prefix.startswith(name + ".")]
    for owner, weights in mine:
        weights.load(owner, ())
        weights.held = True
    try:
        yield module
    finally:
        for owner, weights in mine:
            weights.held = False
            weights.drop(owner, (), None)


def release(model: nn.Module) -> None:
    """Remove a streamed model's hooks (its weights are on the meta device: nothing else to free)."""
    for handle in getattr(model, STREAMED_ATTR, None) or ():
        handle.remove()
    setattr(model, WEIGHTS_ATTR, None)
