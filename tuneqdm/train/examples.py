"""What a run trains on: its subjects (folders and prompts, a toy subject's class word filling ``<class>``), the
checks on them that need no model, and the photos and class images every step draws from."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TuneQDMError
from .config import TrainConfig
from .data import Photo, Subject, load_folder, rare_token_problem, read_subjects_file, subject_metadata, warn

CLASS_PLACEHOLDER = "<class>"  # replaced by the class of a toy subject folder's subject.json


@dataclass
class Examples:
    """Instance photos (with the prompt and class group of each) and class images (by group)."""

    instance_pixels: torch.Tensor
    instance_prompt_ids: list[int]
    instance_groups: list[int]
    class_pixels: torch.Tensor | None
    class_members: list[list[int]]  # per class group, indices into class_pixels
    class_prompt_ids: list[int]  # per class group
    prompts: list[str]


def read_subjects(cfg: TrainConfig) -> list[Subject]:
    """The subjects of ``--subjects`` or of ``--instance_data_dir``, their prompts' placeholders filled in."""
    if cfg.subjects:
        entries = read_subjects_file(cfg.subjects)
    else:
        entries = [{"instance_data_dir": Path(cfg.instance_data_dir), "instance_prompt": cfg.instance_prompt}]
    subjects = []
    for e in entries:
        meta = subject_metadata(e["instance_data_dir"])
        prompt = e.get("instance_prompt") or meta.get("instance_prompt")
        if not prompt:
            raise TuneQDMError(f"--instance_prompt is required for {e['instance_data_dir']} "
                               "(e.g. \"a sks dog\")")
        class_prompt = e.get("class_prompt") or cfg.class_prompt or meta.get("class_prompt")
        noun = meta.get("class") if isinstance(meta.get("class"), str) else None
        if CLASS_PLACEHOLDER in prompt or CLASS_PLACEHOLDER in (class_prompt or ""):
            if noun is None:
                raise TuneQDMError(f"the prompt has a {CLASS_PLACEHOLDER} placeholder but "
                                   f"{e['instance_data_dir']} has no subject.json naming the class: "
                                   "write the class word instead")
            prompt = prompt.replace(CLASS_PLACEHOLDER, noun)
            class_prompt = class_prompt.replace(CLASS_PLACEHOLDER, noun) if class_prompt else None
        subject = Subject(Path(e["instance_data_dir"]), prompt, class_prompt)
        subject.noun = noun
        subjects.append(subject)
    return subjects


def validation_prompt(cfg: TrainConfig, subjects: list[Subject]) -> str | None:
    """``--validation_prompt`` with its ``<class>`` placeholder replaced by the subjects' one class word."""
    prompt = cfg.validation_prompt
    if prompt and CLASS_PLACEHOLDER in prompt:
        nouns = {s.noun for s in subjects}
        if len(nouns) != 1 or None in nouns:
            raise TuneQDMError(f"--validation_prompt has a {CLASS_PLACEHOLDER} placeholder but the subjects do "
                               "not name one class: write the class word instead")
        prompt = prompt.replace(CLASS_PLACEHOLDER, nouns.pop())
    return prompt


def check_subjects(cfg: TrainConfig, subjects: list[Subject]) -> None:
    """A prompt without a rare token is warned about; prior preservation needs a class prompt per subject."""
    for s in subjects:
        problem = rare_token_problem(s.instance_prompt, s.class_prompt)
        if problem:
            warn(problem)
        if cfg.with_prior_preservation and not s.class_prompt:
            raise TuneQDMError("--with_prior_preservation needs --class_prompt (e.g. \"a dog\")")


def build_examples(cfg: TrainConfig, subjects: list[Subject], resolution: int, class_root: Path,
                   class_photos: Callable[[str, Path], list[Photo]]) -> Examples:
    """The subjects' photos and (prior preservation) the class images of each class prompt, which
    ``class_photos(prompt, folder)`` reads, generating the missing ones; one class prompt uses ``class_root``
    itself, several one subfolder each."""
    prompts: list[str] = []

    def prompt_id(p):
        if p not in prompts:
            prompts.append(p)
        return prompts.index(p)

    pixels, pids, groups = [], [], []
    class_prompts = []
    for s in subjects:
        s.photos = load_folder(s.instance_data_dir, resolution, cfg.center_crop, cfg.seed)
        group = -1
        if cfg.with_prior_preservation:
            if s.class_prompt not in class_prompts:
                class_prompts.append(s.class_prompt)
            group = class_prompts.index(s.class_prompt)
        for photo in s.photos:
            pixels.append(photo.pixels)
            pids.append(prompt_id(s.instance_prompt))
            groups.append(group)
    class_pixels, members, class_pids = None, [], []
    if cfg.with_prior_preservation:
        cls_px = []
        for cp in class_prompts:
            photos = class_photos(cp, class_root if len(class_prompts) == 1 else class_root / _slug(cp))
            members.append(list(range(len(cls_px), len(cls_px) + len(photos))))
            cls_px += [p.pixels for p in photos]
            class_pids.append(prompt_id(cp))
        class_pixels = torch.stack(cls_px)
    return Examples(torch.stack(pixels), pids, groups, class_pixels, members, class_pids, prompts)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "class"
