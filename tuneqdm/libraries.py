"""Calls into diffusers and transformers made quiet (no per-component bars) and version-proof (the dtype argument).

One home below both ``tuneqdm.sampling`` and the embedded toy pipeline (``tuneqdm.toy.pipeline``), which load
pipelines the same way. diffusers and transformers are imported on use: they are slow to import and ``tuneqdm
--help`` needs neither.
"""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version


def quiet_loading() -> None:
    """No per-component loading bars (they are noise next to tuneqdm's own progress)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


DTYPE_RENAMED_IN = "0.40.0"  # diffusers' from_pretrained takes ``dtype`` from here on, ``torch_dtype`` before


def dtype_kwarg(dtype, diffusers_version: str | None = None) -> dict:
    """``dtype=`` for diffusers that renamed ``torch_dtype`` (0.40+, which warn on the old name), ``torch_dtype=``
    for older ones (which do not know ``dtype``): the installed version, read from its package metadata."""
    installed = Version(diffusers_version or version("diffusers"))
    return {"dtype": dtype} if installed >= Version(DTYPE_RENAMED_IN) else {"torch_dtype": dtype}
