"""Float models that never sit in memory whole: each module's weights are read from the checkpoint when it runs.

A text encoder runs once per prompt, a float denoiser once per step of a class image; holding a 4.76 B-parameter T5
in float32 for that costs 19 GB. A streamed model is built on the meta device from its config, and every module
that holds weights gets two PyTorch forward hooks: before it runs, its tensors are read from the model's own
safetensors files (``tuneqdm.shards.read_tensor``: one short mapping per tensor), cast to the compute dtype and put
on the execution device; after it ran they go back to the meta device. At most one module's float weights (e.g. one
4096x10240 Linear) are resident at a time, plus the model's first parameter (usually its token embedding), which
stays: transformers and diffusers models report their device from their first parameter, and pipelines create their
tensors on that device. The numbers are those of the whole model loaded in the compute dtype: the same weights go
through the same operations. Like tuneqdm's other hooks, these leave ``forward`` and the module tree untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import TuneQDMError
from ..shards import read_tensor, tensor_files

STREAMED_ATTR = "_tuneqdm_streamed"  # on a streamed model: the handles of its hooks


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
    """One module's own parameters, read from the files before it runs and dropped to the meta device after."""

    def __init__(self, entries: list[tuple[str, Path, str]], device, dtype: torch.dtype):
        self.entries, self.device, self.dtype = entries, torch.device(device), dtype

    def load(self, module: nn.Module, args) -> None:
        for leaf, shard, key in self.entries:
            t = read_tensor(shard, key)
            setattr(module, leaf, nn.Parameter(t.to(self.device, self.dtype), requires_grad=False))

    def drop(self, module: nn.Module, args, output) -> None:
        for leaf, _, _ in self.entries:
            old = getattr(module, leaf)
            setattr(module, leaf, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"),
                                               requires_grad=False))


def stream(model: nn.Module, files: dict[Path, list[str]], device, dtype: torch.dtype, where) -> nn.Module:
    """``model`` (built on the meta device, in ``dtype``) made to run on ``device`` with each module's weights read
    from ``files`` as it runs; its first parameter and its buffers (small) are loaded now and stay."""
    names = stored_names(model, files, where)
    shards = tensor_files(files)
    _load_buffers(model, shards, device, dtype, where)
    own = {prefix: [(leaf, p, names[f"{prefix}.{leaf}" if prefix else leaf])
                    for leaf, p in module.named_parameters(recurse=False)] for prefix, module in model.named_modules()}
    first = next(model.parameters(), None)
    if first is not None:  # resident, on every module that holds it (tied): the model's device is read from it
        key = next(key for entries in own.values() for _, p, key in entries if p is first)
        resident = nn.Parameter(read_tensor(shards[key], key).to(device, dtype), requires_grad=False)
        for prefix, entries in own.items():
            for leaf, p, _ in entries:
                if p is first:
                    setattr(model.get_submodule(prefix), leaf, resident)
    handles: list[RemovableHandle] = []
    for prefix, entries in own.items():
        streamed = [(leaf, shards[key], key) for leaf, p, key in entries if p is not first]
        if streamed:
            weights, module = _Weights(streamed, device, dtype), model.get_submodule(prefix)
            handles += [module.register_forward_pre_hook(weights.load), module.register_forward_hook(weights.drop)]
    setattr(model, STREAMED_ATTR, handles)
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


def release(model: nn.Module) -> None:
    """Remove a streamed model's hooks (its weights are on the meta device: nothing else to free)."""
    for handle in getattr(model, STREAMED_ATTR, None) or ():
        handle.remove()
