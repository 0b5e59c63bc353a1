"""Seeing a denoiser's calls: read its call arguments by name, run something on each timestep.

Routing (``tuning.routing``), activation quantization and calibration (``ptq/``) all need the ``timestep`` (and
sometimes the sample or the text embeddings) a pipeline passes to its denoiser, by position or by keyword. Like
diffusers' ``HookRegistry``, one module installs such hooks and hands back what removes them; unlike it, they are
PyTorch's public forward pre-hooks, which leave ``module.forward`` and the ``state_dict`` untouched (diffusers'
registry rewrites ``forward``) and cannot change the arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle

from .families import timestep_argument


class CallArguments:
    """The arguments of one ``forward`` call, readable by parameter name whether passed by position or keyword."""

    def __init__(self, signature: inspect.Signature, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs
        self._positions = {name: i for i, name in enumerate(signature.parameters)}

    def named(self) -> dict:
        """Every argument this call passed, by parameter name (positional ones beyond the signature left out)."""
        names = list(self._positions)
        return {**{names[i]: v for i, v in enumerate(self.args) if i < len(names)}, **self.kwargs}

    def get(self, *names: str):
        """The value of the first of ``names`` that this call passed, or None."""
        for name in names:
            if name in self.kwargs:
                return self.kwargs[name]
            position = self._positions.get(name)
            if position is not None and position < len(self.args):
                return self.args[position]
        return None


def forward_signature(module: nn.Module) -> inspect.Signature | None:
    """The signature of ``module.forward`` (None when it cannot be read, e.g. some compiled or builtin forwards)."""
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


def on_call(module: nn.Module, callback: Callable[[CallArguments], object]) -> RemovableHandle:
    """Run ``callback(call_arguments)`` before every forward of ``module``; the handle that removes it. When
    ``module.forward``'s signature cannot be read, only keyword arguments are found by name."""
    signature = forward_signature(module) or inspect.Signature()

    def hook(_module, args, kwargs):
        callback(CallArguments(signature, args, kwargs))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def on_timestep(module: nn.Module, callback: Callable[[object, CallArguments], object]) -> RemovableHandle | None:
    """Run ``callback(timestep, call_arguments)`` before every forward of ``module`` (``timestep`` None for a call
    that leaves it out); the handle that removes it, or None (nothing installed) when ``module.forward`` has no
    timestep parameter (``timestep``, or the one its family names: ``families.timestep_argument``)."""
    signature, name = forward_signature(module), timestep_argument(module)
    if signature is None or name not in signature.parameters:
        return None
    return on_call(module, lambda call: callback(call.get(name), call))


def given_timesteps(callback: Callable[[object], object]) -> Callable[[object, CallArguments], None]:
    """An ``on_timestep`` callback that calls ``callback(timestep)`` for the calls that pass a timestep only."""

    def call_back(t, _call: CallArguments) -> None:
        if t is not None:
            callback(t)

    return call_back
