"""Personal subjects for the toy world: unique patterned objects (no caption can produce one), their photos, and the
DreamBooth-style evaluation prompts."""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import TuneQDMError
from ..files import check_output_folder
from .world import CLASSES, COLOURS, MARK_ANCHORS, PLACES, Scene, caption, render, sample_pose, seed_entropy

PATTERNS: tuple[str, ...] = ("stripes", "dots", "checker", "rings", "split", "zigzag")
MARKINGS: tuple[str, ...] = ("dot", "cross", "eye", "diamond")
TOKEN = "sks"

_LUM = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Instance:
    """A unique object: ``primary``/``secondary`` colours in a ``pattern`` plus a ``marking`` emblem of a third colour
    at ``marking_pos`` (object frame, unit radius, y down) of radius ``marking_size``. ``pattern_scale`` is the
    pattern's period in object units and ``pattern_angle`` its direction in degrees; both live in the object's frame,
    so the pattern turns and scales with the object."""

    noun: str
    primary: tuple[int, int, int]
    secondary: tuple[int, int, int]
    pattern: str
    pattern_scale: float
    pattern_angle: float
    marking: str
    marking_colour: tuple[int, int, int]
    marking_pos: tuple[float, float]
    marking_size: float

    def recoloured(self, colour_name: str) -> "Instance":
        """The same instance with its primary colour replaced by ``COLOURS[colour_name]``."""
        if colour_name not in COLOURS:
            raise ValueError(f"unknown colour {colour_name!r}: choose from {', '.join(COLOURS)}")
        return replace(self, primary=tuple(COLOURS[colour_name]))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("primary", "secondary", "marking_colour", "marking_pos"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Instance":
        d = dict(d)
        for k in ("primary", "secondary", "marking_colour", "marking_pos"):
            d[k] = tuple(d[k])
        return cls(**d)

    def paint(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Colours ``(..., 3) float32`` at object-frame coordinates ``(u, v)``."""
        th = np.deg2rad(self.pattern_angle)
        a = u * np.cos(th) + v * np.sin(th)
        b = -u * np.sin(th) + v * np.cos(th)
        p = self.pattern_scale
        if self.pattern == "stripes":
            sec = np.mod(a / p, 1.0) < 0.5
        elif self.pattern == "dots":
            fa, fb = np.mod(a / p, 1.0) - 0.5, np.mod(b / p, 1.0) - 0.5
            sec = fa * fa + fb * fb < 0.3 ** 2
        elif self.pattern == "checker":
            sec = (np.floor(a / p) + np.floor(b / p)) % 2 == 0
        elif self.pattern == "rings":
            sec = np.mod(np.sqrt(u * u + v * v) / p, 1.0) < 0.5
        elif self.pattern == "split":
            sec = a > 0
        elif self.pattern == "zigzag":
            tri = np.abs(np.mod(b / p, 1.0) - 0.5) * p
            sec = np.mod((a + tri) / p, 1.0) < 0.45
        else:
            raise ValueError(f"unknown pattern {self.pattern!r}")
        out = np.where(sec[..., None], np.array(self.secondary, np.float32), np.array(self.primary, np.float32))
        # the marking, with a thin dark border so it reads on any pattern
        mx, my = self.marking_pos
        r = self.marking_size
        du, dv = u - mx, v - my
        d = np.sqrt(du * du + dv * dv)
        mc = np.array(self.marking_colour, np.float32)
        dark = np.array([20.0, 20.0, 25.0], np.float32)
        if self.marking == "dot":
            inside, border = d < r * 0.8, d < r
        elif self.marking == "diamond":
            m = np.abs(du) + np.abs(dv)
            inside, border = m < r * 0.85, m < r * 1.08
        elif self.marking == "cross":
            t = 0.32 * r
            arm = lambda tt, rr: ((np.abs(du) < tt) & (np.abs(dv) < rr)) | ((np.abs(dv) < tt) & (np.abs(du) < rr))
            inside, border = arm(t, r), arm(t + 0.08 * r + 0.02, r + 0.12 * r)
        elif self.marking == "eye":
            out = np.where((d < r)[..., None], dark, out)
            out = np.where((d < r * 0.85)[..., None], np.array([250.0, 250.0, 250.0], np.float32), out)
            inside, border = d < r * 0.55, d < r * 0.55
            out = np.where(inside[..., None], mc, out)
            return np.where((d < r * 0.25)[..., None], dark, out)
        else:
            raise ValueError(f"unknown marking {self.marking!r}")
        out = np.where(border[..., None], dark, out)
        return np.where(inside[..., None], mc, out)


def _rgb(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _dist(a, b):
    return float(np.linalg.norm(np.array(a, float) - np.array(b, float)))


def make_instance(seed: int) -> Instance:
    """A deterministic unique instance; different seeds give different pattern, colours and marking."""
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(seed, "instance")))
    noun = CLASSES[int(rng.integers(len(CLASSES)))]
    h = rng.random()
    primary = _rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
    for _ in range(100):
        secondary = _rgb(h + rng.uniform(0.25, 0.75), rng.uniform(0.3, 1.0), rng.uniform(0.2, 1.0))
        lum_gap = abs(float(np.dot(primary, _LUM)) - float(np.dot(secondary, _LUM)))
        if _dist(primary, secondary) > 150 and lum_gap > 45:
            break
    candidates = [_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)) for _ in range(12)]
    candidates += [(250, 250, 250), (25, 25, 25)]
    marking_colour = max(candidates, key=lambda c: min(_dist(c, primary), _dist(c, secondary)))
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    marking = MARKINGS[int(rng.integers(len(MARKINGS)))]
    anchors = MARK_ANCHORS[noun]
    ax, ay, amax = anchors[int(rng.integers(len(anchors)))]
    return Instance(noun=noun, primary=primary, secondary=secondary, pattern=pattern,
                    pattern_scale=round(float(rng.uniform(0.38, 0.62)), 4),
                    pattern_angle=round(float(rng.uniform(0.0, 180.0)), 2), marking=marking,
                    marking_colour=tuple(int(c) for c in marking_colour), marking_pos=(ax, ay),
                    marking_size=round(float(amax * rng.uniform(0.85, 1.0)), 4))


def subject_photos(instance: Instance, seed: int, n: int) -> list[tuple[Scene, np.ndarray]]:
    """``n`` photos of ``instance`` in varied poses on 2-3 places (sometimes on the plain background)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(seed, "photos")))
    keys = tuple(PLACES)
    k = int(rng.integers(2, 4))
    places = [keys[i] for i in rng.choice(len(keys), size=k, replace=False)]
    photos = []
    for i in range(n):
        place = places[i % k] if i < k else (None if rng.random() < 0.2 else places[int(rng.integers(k))])
        size, x, y, angle, flip = sample_pose(rng, instance.noun, size_range=(0.5, 0.7))
        scene = Scene(instance.noun, None, None, place, x, y, size, angle, flip, instance)
        photos.append((scene, render(scene, rng)))
    return photos


# ---------------------------------------------------------------------------------------------------------------
# evaluation prompts (DreamBooth's object prompts, in this world's vocabulary)

_EVAL_TARGETS: tuple[dict, ...] = tuple(
    [{"place": p, "colour": None, "material": None} for p in PLACES]
    + [{"place": None, "colour": c, "material": None} for c in ("red", "purple", "green", "blue", "yellow", "orange")]
    + [{"place": None, "colour": None, "material": m} for m in ("shiny", "glass", "metal")]
    + [{"place": p, "colour": c, "material": None}
       for c, p in (("red", "snow"), ("blue", "desert"), ("yellow", "night"), ("purple", "beach"))]
)


def _template(target: dict) -> str:
    scene = Scene("{noun}", target["colour"], target["material"], None, 0.5, 0.5, 0.5, 0.0, False)
    text = caption(scene, token="{token}")
    if target["place"]:
        text += " " + PLACES[target["place"]]
    return text


EVAL_PROMPT_TEMPLATES: tuple[str, ...] = tuple(_template(t) for t in _EVAL_TARGETS)


def parse_seeds(spec: str) -> list[int]:
    """Toy subject seeds written like ``0-9`` or ``0,3,5`` (what ``--subjects`` takes)."""
    seeds = []
    try:
        for part in spec.split(","):
            a, _, b = part.strip().partition("-")
            seeds += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise TuneQDMError(f"--subjects {spec!r}: write toy subject seeds like 0-9 or 0,3,5") from None
    return seeds


def eval_prompts(token: str, noun: str) -> list[str]:
    """The 25 evaluation prompts for a subject, e.g. ``"a sks star in the snow"``."""
    return [t.format(token=token, noun=noun) for t in EVAL_PROMPT_TEMPLATES]


def eval_prompt_targets(token: str | None = None, noun: str | None = None) -> list[dict]:
    """For each prompt of :func:`eval_prompts`, the scene attributes it asks for: ``{"place", "colour", "material"}``
    (None where the prompt does not ask). The arguments are accepted for symmetry and do not change the answer."""
    return [dict(t) for t in _EVAL_TARGETS]


# ---------------------------------------------------------------------------------------------------------------
# writing a subject folder

SUBJECT_FILES = ("[0-9][0-9].png", "[0-9][0-9].jpg", "subject.json")  # what write_subject writes


def photo_count(seed: int) -> int:
    """How many photos ``write_subject`` writes for the subject of ``seed`` by default (4-6)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(seed, "count")))
    return int(rng.integers(4, 7))


def write_subject(seed: int, out: Path, *, n_photos: int | None = None, force: bool = False) -> dict:
    """Write ``00.png ...`` and ``subject.json`` for the subject of ``seed`` into ``out`` (atomically: built next to
    it, then renamed). Refuses a non-empty ``out`` unless ``force``; ``force`` replaces a folder that holds only files
    this function writes. Returns the ``subject.json`` content."""
    out = Path(out)
    n = photo_count(seed) if n_photos is None else int(n_photos)
    if not 1 <= n <= 100:
        raise TuneQDMError(f"number of photos must be between 1 and 100, got {n}")
    if out.exists() and not out.is_dir():
        raise TuneQDMError(f"output {out} exists and is not a folder: choose another --out")
    existing = out.is_dir() and any(out.iterdir())
    check_output_folder(out, force, SUBJECT_FILES, "a toy subject")

    instance = make_instance(seed)
    photos = subject_photos(instance, seed, n)
    noun = instance.noun
    meta = {
        "seed": int(seed),
        "class": noun,
        "token": TOKEN,
        "instance_prompt": f"a {TOKEN} {noun}",
        "class_prompt": f"a {noun}",
        "prompts": eval_prompts(TOKEN, noun),
        "targets": eval_prompt_targets(),
        "instance": instance.to_dict(),
        "photos": [{"file": f"{i:02d}.png", "caption": caption(scene, TOKEN), "place": scene.place,
                    "x": round(scene.x, 4), "y": round(scene.y, 4), "size": round(scene.size, 4),
                    "angle": round(scene.angle, 2), "flip": scene.flip} for i, (scene, _) in enumerate(photos)],
    }

    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        for i, (_, img) in enumerate(photos):
            Image.fromarray(img).save(tmp / f"{i:02d}.png", format="PNG", compress_level=6)
        (tmp / "subject.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if existing:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # replaces an empty folder too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta

