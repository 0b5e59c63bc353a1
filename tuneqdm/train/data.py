"""Instance and class photos: read, checked and made into equal square RGB tensors; prompts checked.

Every photo is EXIF-rotated, converted to RGB (CMYK, grey, 16-bit, palette and transparent images included:
transparency is composited on white), resized so that its short side is ``resolution`` and cropped to a square
(centre crop, or a seeded random crop). Files that are not images, and images that are truncated or unreadable, are
skipped with a one-line warning; a folder left with no image is a one-line error.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import TuneQDMError
from ..files import check_prompt
from ..photos import IMAGE_SUFFIXES, read_photo, warn

KNOWN_SIDECARS = {"subject.json"}  # metadata written next to photos by `tuneqdm toy subject`: not warned about
TINY_FRACTION = 0.5  # photos whose short side is below this share of --resolution get a warning (then upscaled)


@dataclass
class Photo:
    path: Path
    pixels: torch.Tensor  # (3, resolution, resolution) in [-1, 1]


@dataclass
class Subject:
    """One subject: its photos and its instance prompt (several subjects train one adapter)."""

    instance_data_dir: Path
    instance_prompt: str
    class_prompt: str | None = None
    photos: list[Photo] = field(default_factory=list)
    noun: str | None = None  # the class word, when the folder's subject.json names it


def square(image: Image.Image, resolution: int, center_crop: bool, rng: random.Random) -> Image.Image:
    """Resize the short side to ``resolution`` (bicubic; box-filtered when shrinking a lot), then crop a square."""
    w, h = image.size
    scale = resolution / min(w, h)
    new = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1).div_(127.5).sub_(1.0)


def load_folder(folder, resolution: int, center_crop: bool = True, seed: int = 0, what: str = "--instance_data_dir",
                min_images: int = 1) -> list[Photo]:
    """Every readable photo of ``folder`` (sorted by name), as ``resolution``-square tensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TuneQDMError(f"{what} {folder} is not a folder")
    rng = random.Random(seed)
    photos, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if path.is_dir() or path.name in KNOWN_SIDECARS:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(path.name)
            continue
        image = read_photo(path)
        if image is None:
            continue
        if min(image.size) < TINY_FRACTION * resolution:
            warn(f"{path} is only {image.size[0]}x{image.size[1]} px, under half of --resolution {resolution}: "
                 "upscaled, expect blur")
        photos.append(Photo(path, to_tensor(square(image, resolution, center_crop, rng))))
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warn(f"skipping {len(skipped)} non-image file{'s' * (len(skipped) > 1)} in {folder}: "
             f"{', '.join(skipped[:3])}{more}")
    if len(photos) < min_images:
        raise TuneQDMError(f"{what} {folder} has no readable images (png, jpg, webp, bmp, gif, tiff)")
    return photos


def subject_metadata(folder) -> dict:
    """The ``subject.json`` of a toy subject folder (``{}`` when there is none or it is not valid JSON)."""
    path = Path(folder) / "subject.json"
    try:
        meta = json.loads(path.read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def read_subjects_file(path) -> list[dict]:
    """``--subjects FILE``: a JSON list of {"instance_data_dir", "instance_prompt"} (folders relative to the file)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except OSError as e:
        raise TuneQDMError(f"cannot read --subjects {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise TuneQDMError(f"--subjects {path} is not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise TuneQDMError(f"--subjects {path} must hold a non-empty JSON list of "
                           '{"instance_data_dir": ..., "instance_prompt": ...} objects')
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "instance_data_dir" not in e:
            raise TuneQDMError(f"--subjects {path}: entry {i} needs an \"instance_data_dir\"")
        unknown = set(e) - {"instance_data_dir", "instance_prompt", "class_prompt"}
        if unknown:
            raise TuneQDMError(f"--subjects {path}: entry {i} has unknown key {sorted(unknown)[0]!r} "
                               "(allowed: instance_data_dir, instance_prompt, class_prompt)")
        for key in ("instance_prompt", "class_prompt"):
            if not isinstance(e.get(key), (str, type(None))):
                raise TuneQDMError(f"--subjects {path}: entry {i}'s {key!r} must be a string")
            check_prompt(e.get(key), f"--subjects {path}: entry {i}'s {key!r}")
        folder = Path(e["instance_data_dir"])
        out.append({**e, "instance_data_dir": folder if folder.is_absolute() else path.parent / folder})
    return out


# ---- prompts ------------------------------------------------------------------------------------------------------
_COMMON = set("""
a an the of in on at to with and or for from by my our your his her their its this that photo photograph picture
image portrait close up closeup high quality detailed painting drawing render rendering sketch style art of
dog cat puppy kitten person man woman boy girl child baby face toy teddy bear car bike bicycle house building cup mug
bottle vase backpack bag shoe shoes sneaker hat glasses clock watch chair table sofa bowl plush robot duck bird
fish flower plant tree sunglasses candle can teapot boot
red orange yellow green blue purple white black pink brown grey gray gold silver shiny glass metal wooden
star heart ball box pyramid moon cross arrow ring snow beach grass brick wall wood floor water floating night sky
starry desert fabric city jungle rug top front background around flowers
""".split())


def words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9<>_]+", prompt.lower())


def rare_token_problem(instance_prompt: str, class_prompt: str | None = None) -> str | None:
    """Why ``instance_prompt`` lacks a rare identifier (DreamBooth's ``sks``), or None when it has one.

    Heuristic: the prompt needs a word that is neither a common English/photo word nor a word of the class prompt.
    """
    ws = words(instance_prompt)
    if not ws:
        return f"instance prompt {instance_prompt!r} is empty"
    rare = [w for w in ws if w not in _COMMON and len(w) > 1]
    if class_prompt:
        rare = [w for w in rare if w not in set(words(class_prompt))]
    if not rare:
        return (f"instance prompt {instance_prompt!r} has no rare identifier token: the model will change its idea "
                "of every such object; add one, e.g. 'a sks dog'")
    return None
