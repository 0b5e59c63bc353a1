"""Reading a photo: any readable image file as upright 8-bit RGB, or a one-line warning and None.

Below both training (``tuneqdm.train.data``) and evaluation (``tuneqdm.eval.evaluate``), which read the same
subject folders.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import TrainWarning
from .files import first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def warn(message: str) -> None:
    warnings.warn(message, TrainWarning, stacklevel=2)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16/32-bit integer and float greys rescaled, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        if image.mode == "F" and a.max() <= 1.0:
            hi = 1.0
        image = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def read_photo(path: Path) -> Image.Image | None:
    """The photo at ``path`` as upright RGB, or None (after a warning) when it is not a readable image."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                image = to_rgb(image)
        for w in caught:  # PIL's two-line warning (file, line, source) as one line; other warnings pass through
            if issubclass(w.category, Image.DecompressionBombWarning):
                warn(f"{path} is very large ({image.size[0]}x{image.size[1]} px): reading it takes time and memory")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return image
    except Image.DecompressionBombError as e:
        warn(f"skipping {path}: too large to read safely ({str(e).split(',')[0]})")
    except UnidentifiedImageError:
        warn(f"skipping {path}: not an image")
    except (OSError, SyntaxError, ValueError) as e:
        warn(f"skipping {path}: unreadable or truncated image ({first_line(e, None)})")
    return None
