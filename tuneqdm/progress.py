"""Progress on stderr for every step that takes more than a few seconds: one mechanism, one quiet switch.

Everything goes through tqdm (a dependency) to stderr, so stdout keeps only results. ``--quiet`` on any command calls
:func:`set_quiet`, which silences every bar and stage of tuneqdm and the diffusers pipelines it loads. This module
imports nothing from tuneqdm, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import sys

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (True) or show (False) every tuneqdm progress bar from now on."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def quiet_while(quiet: bool):
    """Silence progress for the block when ``quiet`` (e.g. ``TrainConfig.quiet``); restore the previous state after."""
    previous = _quiet
    set_quiet(previous or quiet)
    try:
        yield
    finally:
        set_quiet(previous)


def progress(iterable=None, desc: str = "", total: int | None = None, unit: str = "it", leave: bool = True,
             disable: bool = False, **kwargs):
    """A tqdm bar on stderr named by what it is doing; silent when quiet (or ``disable``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=_quiet or disable, file=sys.stderr,
                dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def stage(desc: str):
    """One line for a step with no natural count (loading, quantizing): its name now, its duration when done."""
    bar = progress(desc=desc, total=1, bar_format="{desc} ... {elapsed}")
    try:
        yield bar
    finally:
        bar.close()  # shows the elapsed time once more, and ends the line


def pipeline_progress(pipe, desc: str = "denoising") -> None:
    """Show a diffusers pipeline's per-step bar (one per call, cleared when done) unless quiet."""
    pipe.set_progress_bar_config(desc=desc, leave=False, disable=_quiet, file=sys.stderr, dynamic_ncols=True)
