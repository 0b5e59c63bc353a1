"""The procedural toy world: captioned 64x64 scenes and personal subjects for tiny diffusion models."""

from .subjects import (EVAL_PROMPT_TEMPLATES, Instance, eval_prompt_targets, eval_prompts, make_instance,
                       subject_photos, write_subject)
from .pipeline import default_pipeline
from .world import CLASSES, COLOURS, MATERIALS, PLACES, Scene, caption, make_dataset, render, sample_scene

__all__ = [
    "CLASSES", "COLOURS", "EVAL_PROMPT_TEMPLATES", "Instance", "MATERIALS", "PLACES", "Scene", "caption", "default_pipeline",
    "eval_prompt_targets", "eval_prompts", "make_dataset", "make_instance", "render", "sample_scene",
    "subject_photos", "write_subject",
]
