"""Loading diffusers components: quietly (no per-component bars) and with this diffusers version's dtype argument.

One home below both ``tuneqdm.sampling`` and the embedded toy pipeline (``tuneqdm.toy.pipeline``), which load
pipelines the same way. diffusers and transformers are imported on use: they are slow to import and ``tuneqdm
--help`` needs neither.
"""

from __future__ import annotations


def quiet_loading() -> None:
    """No per-component loading bars (they are noise next to tuneqdm's own progress)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def dtype_kwarg(dtype) -> dict:
    """``dtype=`` for diffusers that renamed ``torch_dtype`` (0.36+), ``torch_dtype=`` for older ones."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}
