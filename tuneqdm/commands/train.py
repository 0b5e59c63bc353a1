"""``tuneqdm train``: DreamBooth on a quantized model. Its config is the trainer's own ``TrainConfig``
(``tuneqdm.train.config``), validated there; this is the command's run function."""

from __future__ import annotations

import os
from pathlib import Path

from ..train.config import TrainConfig


def run_train(config: TrainConfig) -> Path:
    """Train (or resume) into ``config.output_dir``; returns it. Says so once when several processes train."""
    from ..train import Trainer, train

    trainer = Trainer(config)
    out = train(config, trainer=trainer)
    if not config.quiet and os.environ.get("RANK", "0") == "0" and not trainer.finished:
        print(f"trained {config.method} for {config.max_train_steps} steps: {out}")
    return out
