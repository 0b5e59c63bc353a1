"""``tuneqdm toy subject`` and ``tuneqdm toy scenes``: the procedural toy world's personal subjects and a grid of its
captioned scenes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneQDMError
from ..files import writes_to
from ..options import QUIET_HELP, option


@dataclass
class ToySubjectConfig:
    """The ``tuneqdm toy subject`` settings; each field is its flag."""

    seed: int = option(help="which subject (any integer)")
    out: str = option(help="output folder (must be empty or absent)")
    photos: int | None = option(None, "number of photos (default: 4-6, from the seed)")
    force: bool = option(False, "replace an existing subject folder")
    quiet: bool = option(False, QUIET_HELP)


@writes_to(lambda config: config.out)
def run_toy_subject(config: ToySubjectConfig) -> dict:
    """Write the subject's photos and subject.json; returns subject.json's content."""
    from ..toy.subjects import write_subject

    out = Path(config.out)
    meta = write_subject(config.seed, out, n_photos=config.photos, force=config.force)
    print(f"toy subject {config.seed}: class {meta['class']}, {len(meta['photos'])} photos, "
          f"instance prompt '{meta['instance_prompt']}', in {out}")
    return meta


@dataclass
class ToyScenesConfig:
    """The ``tuneqdm toy scenes`` settings; each field is its flag."""

    out: str = option(help="output .png file")
    seed: int = option(0)
    num: int = option(16)
    cols: int | None = option(None, "columns (default: about the square root of --num)")
    scale: int = option(2, "nearest-neighbour upscaling of the grid (default: 2)")
    quiet: bool = option(False, QUIET_HELP)


def run_toy_scenes(config: ToyScenesConfig) -> list[str]:
    """Write the grid of ``config.num`` random scenes as one PNG and print their captions, row by row; returns
    them."""
    import numpy as np
    from PIL import Image

    from ..toy.world import make_dataset

    if config.num < 1:
        raise TuneQDMError(f"--num must be at least 1, got {config.num}")
    if config.scale < 1 or config.scale > 8:
        raise TuneQDMError(f"--scale must be between 1 and 8, got {config.scale}")
    if config.cols is not None and config.cols < 1:
        raise TuneQDMError(f"--cols must be at least 1, got {config.cols}")
    out = Path(config.out)
    if out.is_dir():
        raise TuneQDMError(f"--out {out} is a folder: give a .png file name")
    images, captions, _ = make_dataset(config.seed, config.num)
    cols = config.cols or int(np.ceil(np.sqrt(config.num)))
    rows = -(-config.num // cols)
    side, pad = images.shape[1], 2
    grid = np.full((rows * (side + pad) + pad, cols * (side + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        y, x = (pad + k * (side + pad) for k in divmod(i, cols))
        grid[y:y + side, x:x + side] = img
    picture = Image.fromarray(grid)
    if config.scale > 1:
        picture = picture.resize((grid.shape[1] * config.scale, grid.shape[0] * config.scale),
                                 Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    for text in captions:
        print(text)
    return captions
