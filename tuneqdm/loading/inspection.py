"""What a base is, read from its configuration files alone (no model is built): what training checks its settings
against and records in a run's identity before anything loads."""

from __future__ import annotations

from dataclasses import dataclass

from ..families import is_flow_matching
from .source import Source


@dataclass(frozen=True)
class BaseFacts:
    num_train_timesteps: int | None  # the scheduler's (None where its config does not say)
    flow_matching: bool  # read from the scheduler's configuration, not its class
    t5_prompts: bool  # a T5 encoder reads the prompts (their length is then a setting)


def base_facts(source: Source) -> BaseFacts:
    scheduler = source.config("scheduler")
    steps = scheduler.get("num_train_timesteps")
    return BaseFacts(steps if isinstance(steps, int) else None, is_flow_matching(scheduler),
                     source.family.t5_tokenizer is not None)
