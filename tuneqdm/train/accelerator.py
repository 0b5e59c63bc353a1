"""accelerate's ``Accelerator`` for a run: devices, processes, mixed precision and the optional TensorBoard
tracker, each problem one line before any model loads."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TuneQDMError
from ..files import first_line
from .config import TrainConfig


def check_tracker(cfg: TrainConfig) -> None:
    """``--report_to tensorboard`` needs its package, checked before anything loads."""
    if cfg.report_to == "tensorboard":
        from importlib.util import find_spec

        if find_spec("tensorboard") is None and find_spec("tensorboardX") is None:
            raise TuneQDMError("--report_to tensorboard needs TensorBoard, which is not installed: "
                               "pip install tensorboard")


def make_accelerator(cfg: TrainConfig, out: Path, tracker_logs: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    _check_process_precision(cfg.mixed_precision)
    tracking = cfg.report_to == "tensorboard"
    try:
        return Accelerator(
            cpu=not torch.cuda.is_available(),  # several CPU processes: gloo (accelerate's MULTI_CPU)
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
            log_with="tensorboard" if tracking else None,
            project_config=ProjectConfiguration(project_dir=str(out),
                                                logging_dir=str(tracker_logs)) if tracking else None,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)])
    except (ValueError, RuntimeError) as e:
        raise TuneQDMError(f"cannot set up training ({first_line(e, None)})") from None


def _check_process_precision(mixed_precision: str) -> None:
    """accelerate keeps one state per process (its ``Accelerator`` objects share it) and refuses to change its mixed
    precision; a second run in the same process reuses that state, so it must ask for the same precision."""
    from accelerate.state import AcceleratorState, is_initialized

    if is_initialized() and AcceleratorState().mixed_precision != mixed_precision:
        raise TuneQDMError(f"--mixed_precision {mixed_precision}: this process already trained with --mixed_precision "
                           f"{AcceleratorState().mixed_precision}, and accelerate keeps one per process: run this "
                           "training in a new process (e.g. the tuneqdm train command)")


def quiet_libraries() -> None:
    """diffusers' and transformers' progress bars and logs off (``--quiet``, and on every process but the main)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
