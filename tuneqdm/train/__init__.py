"""DreamBooth personalization: ``tuneqdm train`` as a library.

One job per module: ``config`` (settings), ``data`` (photos and prompts), ``examples`` (subjects, photos and class
images of a run), ``prior`` (class images), ``cache`` (memory savers), ``batches`` (each micro-step's seeded draws),
``objective`` (noise, target and loss), ``methods`` (what trains), ``checkpoint`` (resumable state), ``run_folder``
(the output folder and resume identity), ``accelerator``, ``signals`` (Ctrl-C and SIGTERM), ``setup`` (what a run
builds before its first step), ``loop`` (the accelerate loop), ``outputs`` (the adapter folder).
"""

from ..errors import TrainWarning
from .config import METHOD_CHOICES, QUANTIZED_METHODS, TrainConfig
from .loop import Trainer, train
from .signals import TrainingInterrupted

__all__ = ["METHOD_CHOICES", "QUANTIZED_METHODS", "TrainConfig", "TrainWarning", "Trainer", "TrainingInterrupted",
           "train"]
