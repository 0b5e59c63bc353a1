"""DreamBooth personalization: ``tuneqdm train`` as a library.

One job per module: ``config`` (settings), ``data`` (photos and prompts), ``prior`` (class images), ``cache`` (memory
savers), ``methods`` (what trains), ``checkpoint`` (resumable state), ``loop`` (the accelerate loop), ``outputs``
(the adapter folder).
"""

from ..errors import TrainWarning
from .config import METHOD_CHOICES, QUANTIZED_METHODS, TrainConfig
from .loop import Trainer, TrainingInterrupted, train

__all__ = ["METHOD_CHOICES", "QUANTIZED_METHODS", "TrainConfig", "TrainWarning", "Trainer", "TrainingInterrupted",
           "train"]
