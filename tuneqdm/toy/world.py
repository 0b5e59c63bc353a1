"""A seeded procedural world of captioned 64x64 scenes: one large outlined object on a distinctive background.

Built to be easy for a tiny text-to-image model to learn and for small evaluators to classify: ten nouns with very
different silhouettes spanning 45-70 % of the side, eight saturated colours, three materials and twelve places whose
backgrounds differ at low spatial frequency (mean colour, horizon lines) as well as in texture.

The object is drawn at 2x (128 px) with PIL polygons and box-downsampled; backgrounds are cached per place (a few
variants each, built once per process) and varied per scene by a random crop, a mirror and a few random decorations
(stars, flakes, flowers).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # pragma: no cover
    from .subjects import Instance

SIDE = 64
_SS = 2  # supersampling factor of the object layer
_HI = SIDE * _SS

CLASSES: tuple[str, ...] = ("star", "heart", "ball", "box", "pyramid", "moon", "cross", "arrow", "house", "ring")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (255, 135, 0),
    "yellow": (255, 225, 20),
    "green": (35, 175, 50),
    "blue": (30, 80, 230),
    "purple": (140, 40, 190),
    "white": (248, 248, 248),
    "black": (28, 28, 28),
}

MATERIALS: tuple[str, ...] = ("shiny", "glass", "metal")

PLACES: dict[str, str] = {
    "snow": "in the snow",
    "beach": "on the beach",
    "grass": "on top of green grass with flowers around it",
    "brick": "in front of a brick wall",
    "wood": "on top of a wooden floor",
    "water": "floating on top of water",
    "night": "with a starry night sky in the background",
    "desert": "in the desert",
    "fabric": "on top of pink fabric",
    "city": "with a city in the background",
    "jungle": "in the jungle",
    "rug": "on top of a white rug",
}


@dataclass(frozen=True)
class Scene:
    """One object on one background. ``x``, ``y``: centre in [0, 1] (y down); ``size``: span as a fraction of the
    side; ``angle``: degrees, counter-clockwise; ``flip``: mirrored left-right (before rotation)."""

    noun: str
    colour: str | None
    material: str | None
    place: str | None
    x: float
    y: float
    size: float
    angle: float
    flip: bool
    instance: "Instance | None" = None


def caption(scene: Scene, token: str | None = None) -> str:
    """``"a [material] [colour] [token] noun [place phrase]"`` ("an" before a vowel); a metal object has no colour
    word."""
    words = []
    if scene.material:
        words.append(scene.material)
    if scene.colour and scene.material != "metal":
        words.append(scene.colour)
    if token:
        words.append(token)
    words.append(scene.noun)
    if scene.place:
        words.append(PLACES[scene.place])
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


# ---------------------------------------------------------------------------------------------------------------
# seeds


def seed_entropy(seed: int, *salt: str) -> int:
    """Any Python int (negative, huge) plus an optional salt -> a non-negative 256-bit entropy for SeedSequence."""
    text = "|".join((str(int(seed)),) + salt)
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "little")


def _scene_seed(scene: Scene) -> int:
    parts = []
    for f in fields(scene):
        value = getattr(scene, f.name)
        parts.append(f"{f.name}={value!r}")
    return seed_entropy(0, "scene", *parts)


# ---------------------------------------------------------------------------------------------------------------
# sampling


def sample_scene(rng: np.random.Generator, *, p_colour: float = 0.8, p_place: float = 0.8, p_material: float = 0.15,
                 places=None, nouns=None) -> Scene:
    """A random scene; every choice is uniform. A metal object gets no colour."""
    nouns = tuple(nouns) if nouns is not None else CLASSES
    places = tuple(places) if places is not None else tuple(PLACES)
    for n in nouns:
        if n not in CLASSES:
            raise ValueError(f"unknown noun {n!r}: choose from {', '.join(CLASSES)}")
    for p in places:
        if p not in PLACES:
            raise ValueError(f"unknown place {p!r}: choose from {', '.join(PLACES)}")
    noun = nouns[int(rng.integers(len(nouns)))]
    colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))] if rng.random() < p_colour else None
    place = places[int(rng.integers(len(places)))] if (places and rng.random() < p_place) else None
    material = MATERIALS[int(rng.integers(len(MATERIALS)))] if rng.random() < p_material else None
    if material == "metal":
        colour = None
    size, x, y, angle, flip = sample_pose(rng, noun)
    return Scene(noun, colour, material, place, x, y, size, angle, flip)


def sample_pose(rng: np.random.Generator, noun: str, size_range=(0.45, 0.7)) -> tuple[float, float, float, float, bool]:
    """``(size, x, y, angle, flip)``: the object stays mostly inside the image."""
    size = float(rng.uniform(*size_range))
    margin = 0.5 * size * 0.85
    x = float(rng.uniform(margin, 1.0 - margin))
    y = float(rng.uniform(margin, 1.0 - margin))
    angle = float(rng.uniform(-180.0, 180.0)) if noun in ("ball", "ring") else float(rng.uniform(-25.0, 25.0))
    flip = bool(rng.random() < 0.5) if noun in ("arrow", "moon") else False
    return size, x, y, angle, flip


def make_dataset(seed: int, n: int, **sample_kwargs) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` scenes, their captions and images ``(n, 64, 64, 3) uint8``; determined by ``(seed, n, kwargs)``."""
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(seed, "dataset")))
    images = np.empty((n, SIDE, SIDE, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene = sample_scene(rng, **sample_kwargs)
        images[i] = render(scene, rng)
        scenes.append(scene)
        captions.append(caption(scene))
    return images, captions, scenes


# ---------------------------------------------------------------------------------------------------------------
# shapes, in the object's own frame: unit radius, y down; ops are drawn in order onto a shade image
# ("poly", points, value) | ("disk", (cx, cy, r), value) | ("line", points, value); value 0 erases, 200 is the
# plain face, brighter/darker values shade faces, small values draw dark internal edges.

_FACE = 200.0
_EDGE = 12


@lru_cache(maxsize=None)
def _shape_ops(noun: str):
    if noun == "star":
        a = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(a), r * np.sin(a) + 0.095], 1)
        return [("poly", pts, 200)]
    if noun == "heart":
        t = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        hx, hy = hx / 17.0, (hy + 2.5) / 17.0
        return [("poly", np.stack([hx, hy], 1), 200)]
    if noun == "ball":
        return [("disk", (0.0, 0.0, 0.9), 200)]
    if noun == "ring":
        return [("disk", (0.0, 0.0, 0.95), 200), ("disk", (0.0, 0.0, 0.52), 0)]
    if noun == "moon":
        return [("disk", (0.0, 0.0, 0.93), 200), ("disk", (0.45, -0.2, 0.78), 0)]
    if noun == "box":
        front = np.array([[-0.8, -0.4], [0.5, -0.4], [0.5, 0.9], [-0.8, 0.9]])
        top = np.array([[-0.8, -0.4], [-0.5, -0.75], [0.8, -0.75], [0.5, -0.4]])
        side = np.array([[0.5, -0.4], [0.8, -0.75], [0.8, 0.55], [0.5, 0.9]])
        return [("poly", front, 200), ("poly", top, 255), ("poly", side, 140),
                ("line", np.array([[-0.8, -0.4], [0.5, -0.4], [0.8, -0.75]]), _EDGE),
                ("line", np.array([[0.5, -0.4], [0.5, 0.9]]), _EDGE)]
    if noun == "pyramid":
        left = np.array([[0.0, -0.92], [-0.97, 0.72], [0.22, 0.88]])
        right = np.array([[0.0, -0.92], [0.22, 0.88], [0.97, 0.58]])
        return [("poly", left, 215), ("poly", right, 140), ("line", np.array([[0.0, -0.92], [0.22, 0.88]]), _EDGE)]
    if noun == "cross":
        w, e = 0.3, 0.95
        pts = np.array([[-w, -e], [w, -e], [w, -w], [e, -w], [e, w], [w, w], [w, e], [-w, e], [-w, w], [-e, w],
                        [-e, -w], [-w, -w]])
        return [("poly", pts, 200)]
    if noun == "arrow":
        pts = np.array([[-0.95, -0.22], [0.12, -0.22], [0.12, -0.62], [0.98, 0.0], [0.12, 0.62], [0.12, 0.22],
                        [-0.95, 0.22]])
        return [("poly", pts, 200)]
    if noun == "house":
        body = np.array([[-0.68, -0.08], [0.68, -0.08], [0.68, 0.9], [-0.68, 0.9]])
        roof = np.array([[-0.92, -0.05], [0.0, -0.9], [0.92, -0.05]])
        chimney = np.array([[0.38, -0.85], [0.6, -0.85], [0.6, -0.35], [0.38, -0.35]])
        door = np.array([[-0.12, 0.38], [0.22, 0.38], [0.22, 0.9], [-0.12, 0.9]])
        return [("poly", chimney, 150), ("poly", body, 200), ("poly", roof, 140), ("poly", door, 70),
                ("line", np.array([[-0.92, -0.05], [0.92, -0.05]]), _EDGE)]
    raise ValueError(f"unknown noun {noun!r}: choose from {', '.join(CLASSES)}")


# Points well inside each silhouette (object frame) with the largest emblem radius that fits there.
MARK_ANCHORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "star": ((0.0, 0.1, 0.3), (0.0, -0.05, 0.28)),
    "heart": ((-0.38, -0.22, 0.28), (0.38, -0.22, 0.28), (0.0, 0.15, 0.3)),
    "ball": ((0.0, 0.0, 0.32), (-0.35, -0.3, 0.3), (0.35, 0.3, 0.3)),
    "box": ((-0.15, 0.25, 0.32), (-0.45, 0.0, 0.25), (0.15, 0.55, 0.25)),
    "pyramid": ((-0.2, 0.4, 0.28), (0.0, 0.05, 0.22), (0.45, 0.5, 0.2)),
    "moon": ((-0.62, 0.12, 0.22), (-0.45, 0.55, 0.2), (-0.5, -0.4, 0.2)),
    "cross": ((0.0, 0.0, 0.28), (0.0, -0.62, 0.25), (0.62, 0.0, 0.25)),
    "arrow": ((-0.5, 0.0, 0.2), (0.42, 0.0, 0.26), (-0.15, 0.0, 0.2)),
    "house": ((-0.38, 0.3, 0.2), (0.0, -0.45, 0.2), (0.45, 0.3, 0.18)),
    "ring": ((0.0, -0.74, 0.2), (0.74, 0.0, 0.2), (-0.52, 0.52, 0.2)),
}


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a disk of radius ``r`` pixels (shifted ORs: fast for small r)."""
    h, w = mask.shape
    p = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * r + r:
                out |= p[r + dy:r + dy + h, r + dx:r + dx + w]
    return out


# ---------------------------------------------------------------------------------------------------------------
# the object layer

_OUTLINE_DARK = np.array([18.0, 18.0, 22.0], np.float32)
_OUTLINE_LIGHT = np.array([235.0, 235.0, 235.0], np.float32)


def _object_layer(scene: Scene, rng: np.random.Generator):
    """Returns ``(rgb, alpha, y0, x0)``: a window of the 2x canvas (premultiplied later) and its top-left corner."""
    ops = _shape_ops(scene.noun)
    scale = 0.5 * scene.size * _HI  # pixels per object unit
    if not scale > 1e-6:
        return None
    th = np.deg2rad(scene.angle)
    c, s = np.cos(th), np.sin(th)
    fx = -1.0 if scene.flip else 1.0
    # object (u, v) -> image offset (dx, dy), y down, counter-clockwise on screen
    m = scale * np.array([[c * fx, s], [-s * fx, c]])
    centre = np.array([scene.x * _HI, scene.y * _HI])
    minv = np.linalg.inv(m)

    outline_r = 3
    ext = scale * 1.05 + outline_r + 2
    x0 = max(0, int(np.floor((centre[0] - ext) / 2)) * 2)
    y0 = max(0, int(np.floor((centre[1] - ext) / 2)) * 2)
    x1 = min(_HI, int(np.ceil((centre[0] + ext) / 2)) * 2)
    y1 = min(_HI, int(np.ceil((centre[1] + ext) / 2)) * 2)
    if x1 <= x0 or y1 <= y0:
        return None
    w, h = x1 - x0, y1 - y0
    origin = centre - np.array([x0, y0])

    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    line_w = 3
    for op in ops:
        kind, geom, value = op
        if kind == "disk":
            cx, cy, r = geom
            p = origin + m @ np.array([cx, cy])
            rr = r * scale
            draw.ellipse([p[0] - rr, p[1] - rr, p[0] + rr, p[1] + rr], fill=int(value))
        else:
            pts = geom @ m.T + origin
            xy = [(float(a), float(b)) for a, b in pts]
            if kind == "poly":
                draw.polygon(xy, fill=int(value))
            else:
                draw.line(xy, fill=int(value), width=line_w, joint="curve")
    shade = np.asarray(img, dtype=np.float32)
    mask = shade > 0
    if not mask.any():
        return None

    # pixel-centre coordinates: image-space offsets (in object units) and object-frame (u, v)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx = (xx + 0.5 - origin[0]) / scale
    dy = (yy + 0.5 - origin[1]) / scale
    inst = scene.instance
    if inst is not None:
        if scene.colour is not None and scene.material != "metal":
            inst = inst.recoloured(scene.colour)
        mi = minv * scale
        u = mi[0, 0] * dx + mi[0, 1] * dy
        v = mi[1, 0] * dx + mi[1, 1] * dy
        base = inst.paint(u, v)
    else:
        name = scene.colour if scene.colour is not None else tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
        base = np.broadcast_to(np.array(COLOURS[name], np.float32), (h, w, 3))

    face = (shade / _FACE)[..., None]
    lum_base = float(np.mean(base[mask] @ np.array([0.299, 0.587, 0.114], np.float32)))
    alpha = mask.astype(np.float32)
    material = scene.material

    if material == "metal":
        t = 0.6 * dx + 0.8 * dy
        g = 0.62 - 0.18 * dy + 0.42 * np.exp(-((t + 0.35) / 0.16) ** 2) + 0.3 * np.exp(-((t - 0.4) / 0.12) ** 2)
        if inst is not None:
            lum = base @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
            g = g * (0.45 + 0.75 * lum)
        rgb = g[..., None] * np.array([188.0, 194.0, 205.0], np.float32) * face
        dark = False
    elif material == "shiny":
        d2 = (dx + 0.35) ** 2 + (dy + 0.4) ** 2
        radial = np.clip(1.35 - 0.65 * np.sqrt(d2), 0.4, 1.35)
        spec = np.minimum(1.0, 1.15 * np.exp(-d2 / (2 * 0.17 ** 2)))[..., None]
        spec2 = 0.6 * np.exp(-((dx - 0.3) ** 2 + (dy - 0.35) ** 2) / (2 * 0.06 ** 2))[..., None]
        col = base * face * radial[..., None] + 22.0 * (radial[..., None] - 1.0)
        sp = np.maximum(spec, spec2)
        rgb = col * (1 - sp) + 255.0 * sp
        dark = lum_base < 70
    elif material == "glass":
        tint = 0.85 * base + 0.15 * 235.0
        rgb = tint * (0.85 + 0.15 * face)
        inner = ~_dilate(~mask, 3)
        rim = mask & ~inner
        streak = np.exp(-(((dx + dy) * 0.707 + 0.35) / 0.09) ** 2) * (np.abs(dx - dy) < 0.6)
        streak = np.where(inner, streak, 0.0)[..., None]
        rgb = np.where(rim[..., None], np.array([245.0, 250.0, 255.0], np.float32), rgb)
        rgb = rgb * (1 - 0.8 * streak) + 255.0 * 0.8 * streak
        alpha = np.where(rim, 0.92, 0.5 + 0.4 * streak[..., 0]).astype(np.float32) * mask
        dark = lum_base < 70
    else:
        if scene.noun == "ball":
            light = np.clip(1.25 - 0.5 * np.sqrt((dx + 0.35) ** 2 + (dy + 0.35) ** 2), 0.55, 1.25)
        else:
            light = 1.06 - 0.1 * (dx + dy)
        rgb = base * face * light[..., None] + 25.0 * (light[..., None] - 1.0)
        dark = lum_base < 70

    # dark internal edges (value _EDGE in the shade image)
    edge = mask & (shade <= _EDGE + 1)
    if edge.any():
        rgb = np.where(edge[..., None], (_OUTLINE_LIGHT * 0.6 if dark else _OUTLINE_DARK), rgb)

    ring = _dilate(mask, outline_r) & ~mask
    colour = _OUTLINE_LIGHT if dark else _OUTLINE_DARK
    rgb = np.where(ring[..., None], colour, rgb)
    alpha = np.where(ring, 0.9 if material == "glass" else 1.0, alpha).astype(np.float32)
    return rgb.astype(np.float32), alpha, y0, x0


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a ``(64, 64, 3) uint8`` image. ``rng`` varies the background (and the colour of an object with no
    colour); without one the image is a deterministic function of the scene."""
    if scene.noun not in CLASSES:
        raise ValueError(f"unknown noun {scene.noun!r}: choose from {', '.join(CLASSES)}")
    if scene.colour is not None and scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}: choose from {', '.join(COLOURS)}")
    if scene.material is not None and scene.material not in MATERIALS:
        raise ValueError(f"unknown material {scene.material!r}: choose from {', '.join(MATERIALS)}")
    if rng is None:
        rng = np.random.default_rng(np.random.SeedSequence(_scene_seed(scene)))
    out = background(scene.place, rng)
    layer = _object_layer(scene, rng)
    if layer is not None:
        rgb, alpha, y0, x0 = layer
        h, w = alpha.shape
        prem = (rgb * alpha[..., None]).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        a = alpha.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        sy, sx = y0 // 2, x0 // 2
        win = out[sy:sy + h // 2, sx:sx + w // 2]
        win *= (1.0 - a)[..., None]
        win += prem
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# backgrounds: cached textures (2x built, 72 x 96 at 1x), cropped/mirrored per scene, plus random decorations

_TEX_H, _TEX_W = 72, 96
_VARIANTS = 3


def _smooth(rng, h, w, cell):
    """Smooth value noise in about [-1, 1], features ``cell`` pixels wide."""
    gh, gw = h // cell + 3, w // cell + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((gw * cell, gh * cell), Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    return arr[cell:cell + h, cell:cell + w] / 1.2


def _vgrad(h, top, bottom, y0=0.0, y1=None):
    """A vertical colour gradient between rows y0 and y1, shape (h, 1, 3)."""
    y1 = h if y1 is None else y1
    t = np.clip((np.arange(h, dtype=np.float32)[:, None] - y0) / max(1.0, y1 - y0), 0, 1)
    return (np.array(top, np.float32) * (1 - t[..., None]) + np.array(bottom, np.float32) * t[..., None])


def _down(arr):
    h, w = arr.shape[:2]
    return arr.reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))


def _tex_none(rng, H, W):
    return np.full((H, W, 3), 198.0, np.float32) + 2.5 * _smooth(rng, H, W, 16)[..., None]


def _tex_snow(rng, H, W):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    hor = 0.42 * H + 0.06 * H * np.sin(xx[0] / W * 2 * np.pi * 1.3 + rng.uniform(0, 6)) + 4 * _smooth(rng, 1, W, 24)[0]
    sky = _vgrad(H, (120, 170, 230), (190, 215, 240), 0, 0.45 * H)
    # distant blue-grey mountains
    mount = 0.30 * H + 0.07 * H * np.abs(((xx[0] / W * 3.0 + rng.uniform(0, 1)) % 1.0) - 0.5) * 2
    img = np.where((yy < mount[None, :])[..., None], sky, np.array([160, 178, 205], np.float32))
    ground = 244.0 + 8 * _smooth(rng, H, W, 20)
    ground = np.stack([ground - 6, ground - 2, ground + 4], -1)
    drift = np.clip(np.sin((yy - hor[None, :]) / 5.0 + 2 * _smooth(rng, H, W, 30)), 0, 1)
    ground = ground - 14 * drift[..., None] * np.array([1.0, 0.7, 0.2], np.float32)
    img = np.where((yy < hor[None, :])[..., None], img, ground)
    return img


def _tex_beach(rng, H, W):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    sky = _vgrad(H, (95, 170, 240), (185, 220, 250), 0, 0.3 * H)
    sea_top = 0.3 * H
    sea = _vgrad(H, (15, 90, 160), (35, 145, 190), sea_top, 0.5 * H)
    streak = (np.sin(xx / 3.0 + 3 * _smooth(rng, H, W, 10)) > 0.85) & ((yy.astype(int) % 4) == 0)
    sea = np.where(streak[..., None], sea + 45, sea)
    shore = 0.5 * H + 0.04 * H * np.sin(xx[0] / W * 2 * np.pi * 1.5 + rng.uniform(0, 6))
    sand = np.array([236, 208, 148], np.float32) + 10 * _smooth(rng, H, W, 6)[..., None] + \
        4 * rng.standard_normal((H, W, 1)).astype(np.float32)
    img = np.where((yy < sea_top)[..., None], sky, sea)
    img = np.where((yy >= shore[None, :])[..., None], sand, img)
    foam = np.abs(yy - shore[None, :]) < 2.5
    img = np.where(foam[..., None], np.array([245, 248, 250], np.float32), img)
    return img


def _tex_grass(rng, H, W):
    blades = _smooth(rng, H * 4, W, 2)[::4] * 0.5 + 0.5 * _smooth(rng, H, W, 2)
    base = np.array([85, 165, 50], np.float32) + 28 * blades[..., None] * np.array([0.6, 1.0, 0.4], np.float32)
    light = 12 * _smooth(rng, H, W, 40)[..., None]
    return base + light


def _tex_brick(rng, H, W):
    bw, bh = 24, 12  # at 2x
    img = np.empty((H, W, 3), np.float32)
    img[:] = (190, 182, 170)
    for r in range(H // bh + 1):
        off = (bw // 2) * (r % 2) - int(rng.integers(0, bw))
        for c in range(-1, W // bw + 2):
            x0, y0 = off + c * bw + 2, r * bh + 2
            x1, y1 = min(W, x0 + bw - 2), min(H, y0 + bh - 2)
            x0c = max(0, x0)
            if x1 <= x0c or y0 >= H:
                continue
            col = np.array([172, 52, 36], np.float32) * rng.uniform(0.82, 1.12) + rng.uniform(-8, 8, 3)
            img[y0:y1, x0c:x1] = col
    img += 6 * rng.standard_normal((H, W, 1)).astype(np.float32)
    return img


def _tex_wood(rng, H, W):
    img = np.empty((H, W, 3), np.float32)
    y = 0
    grain_noise = _smooth(rng, H, W, 8)
    xx = np.arange(W, dtype=np.float32)[None, :]
    while y < H:
        ph = int(rng.integers(16, 22))
        col = np.array([188, 132, 62], np.float32) * rng.uniform(0.88, 1.08)
        sl = slice(y, min(H, y + ph))
        yy = np.arange(sl.start, sl.stop, dtype=np.float32)[:, None]
        grain = np.sin(yy * 1.3 + 5 * grain_noise[sl] + xx * 0.02 * rng.uniform(-1, 1))
        img[sl] = col + 14 * grain[..., None]
        img[max(0, y):min(H, y + 2)] = (92, 56, 28)
        for j in rng.integers(0, W, 1):
            img[sl, j:j + 2] = (110, 68, 34)
        y += ph
    return img


def _tex_water(rng, H, W):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = _vgrad(H, (20, 70, 150), (40, 120, 200))
    img = np.broadcast_to(img, (H, W, 3)).copy()
    img += 10 * _smooth(rng, H, W, 24)[..., None]
    wav = np.sin((yy + 2.5 * np.sin(xx / 7.0 + yy / 5.0) + 2 * _smooth(rng, H, W, 16)) * (2 * np.pi / 12.0))
    img = np.where((wav > 0.82)[..., None], np.array([150, 200, 240], np.float32), img)
    img = np.where(((wav < -0.9))[..., None], img * 0.8, img)
    return img


def _tex_night(rng, H, W):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.broadcast_to(_vgrad(H, (6, 10, 38), (30, 38, 95)), (H, W, 3)).copy()
    hill = 0.86 * H - 0.06 * H * np.sin(xx[0] / W * 2 * np.pi * 0.8 + rng.uniform(0, 6))
    img = np.where((yy >= hill[None, :])[..., None], np.array([8, 14, 18], np.float32), img)
    return img


def _tex_desert(rng, H, W):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    sky = _vgrad(H, (150, 200, 240), (240, 228, 200), 0, 0.32 * H)
    img = np.broadcast_to(sky, (H, W, 3)).copy()
    sand = np.array([228, 150, 70], np.float32)
    for k, (base, amp, period) in enumerate(((0.33, 0.06, 1.1), (0.5, 0.07, 0.8), (0.7, 0.08, 0.65))):
        ph = rng.uniform(0, 2 * np.pi)
        crest = base * H - amp * H * np.sin(xx[0] / W * 2 * np.pi * period + ph)
        slope = np.cos(xx[0] / W * 2 * np.pi * period + ph)
        col = sand * (0.93 + 0.06 * k) * (1 + 0.1 * slope)[:, None]
        inside = yy >= crest[None, :]
        img = np.where(inside[..., None], col[None, :, :], img)
        ridge = np.abs(yy - crest[None, :]) < 1.5
        img = np.where((ridge & (slope[None, :] > 0))[..., None], sand * 1.12, img)
    img += 3 * rng.standard_normal((H, W, 1)).astype(np.float32)
    return img


def _tex_fabric(rng, H, W):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    fold = np.sin((xx * 0.8 + yy * 0.5) / 14.0 + 2.2 * _smooth(rng, H, W, 48))
    weave = ((xx.astype(int) // 2 + yy.astype(int) // 2) % 2) * 2 - 1
    img = np.array([238, 140, 180], np.float32) * (1 + 0.16 * fold)[..., None] + 5 * weave[..., None]
    return img


def _tex_city(rng, H, W):
    img = np.broadcast_to(_vgrad(H, (60, 70, 145), (250, 170, 110), 0, 0.6 * H), (H, W, 3)).copy()
    for layer, (shade, lo, hi) in enumerate((((75, 75, 105), 0.18, 0.45), ((45, 45, 65), 0.3, 0.6))):
        x = -int(rng.integers(0, 10))
        while x < W:
            bw = int(rng.integers(14, 30))
            top = int(H * rng.uniform(lo, hi))
            col = np.array(shade, np.float32) * rng.uniform(0.85, 1.15)
            xs = slice(max(0, x), min(W, x + bw))
            img[top:, xs] = col
            # windows: 2x3 px (2x scale) on a 6 px grid
            for wy in range(top + 4, H - 4, 7):
                for wx in range(max(0, x) + 3, min(W, x + bw) - 3, 6):
                    if rng.random() < (0.55 if layer else 0.35):
                        img[wy:wy + 3, wx:wx + 2] = (255, 215, 110) if layer else (200, 170, 110)
            x += bw + int(rng.integers(0, 4))
    return img


def _tex_jungle(rng, H, W):
    img = Image.new("RGB", (W, H), (12, 48, 22))
    draw = ImageDraw.Draw(img)
    for _ in range(90):
        cx, cy = rng.uniform(-10, W + 10), rng.uniform(-10, H + 10)
        ln, wd = rng.uniform(14, 30), rng.uniform(5, 10)
        th = rng.uniform(0, np.pi)
        t = np.linspace(-1, 1, 14)
        side = wd * np.sqrt(1 - t ** 2)
        pts = np.concatenate([np.stack([t * ln, side], 1), np.stack([t[::-1] * ln, -side[::-1]], 1)])
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        pts = pts @ rot.T + (cx, cy)
        g = rng.uniform(0.5, 1.0)
        col = (int(25 * g + rng.uniform(0, 20)), int(150 * g), int(40 * g + rng.uniform(0, 15)))
        draw.polygon([tuple(p) for p in pts], fill=col)
        a, b = pts[0], pts[len(t) - 1]
        draw.line([tuple(a), tuple(b)], fill=(int(col[0] * 0.5), int(col[1] * 0.55), int(col[2] * 0.5)), width=1)
    return np.asarray(img, dtype=np.float32).copy()


def _tex_rug(rng, H, W):
    fluff = 0.55 * _smooth(rng, H, W, 2) + 0.45 * rng.standard_normal((H, W)).astype(np.float32)
    base = np.array([240, 229, 200], np.float32) + 16 * fluff[..., None] + 8 * _smooth(rng, H, W, 30)[..., None]
    return base


_TEXTURES = {None: _tex_none, "snow": _tex_snow, "beach": _tex_beach, "grass": _tex_grass, "brick": _tex_brick,
             "wood": _tex_wood, "water": _tex_water, "night": _tex_night, "desert": _tex_desert,
             "fabric": _tex_fabric, "city": _tex_city, "jungle": _tex_jungle, "rug": _tex_rug}


@lru_cache(maxsize=None)
def _texture(place: str | None, variant: int) -> np.ndarray:
    key = "none" if place is None else place
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(variant, "texture", key)))
    tex = _TEXTURES[place](rng, 2 * _TEX_H, 2 * _TEX_W)
    out = np.clip(_down(np.asarray(tex, np.float32)), 0, 255).astype(np.float32)
    out.setflags(write=False)
    return out


_FLOWER_COLOURS = np.array([(235, 50, 60), (255, 220, 40), (250, 250, 250), (240, 120, 200), (150, 90, 230)],
                           np.float32)


def _decorate(place, img, rng):
    H, W = img.shape[:2]
    if place == "night":
        n = int(rng.integers(25, 45))
        ys, xs = rng.integers(0, int(0.85 * H), n), rng.integers(0, W, n)
        b = rng.uniform(150, 255, n)[:, None] * np.array([1.0, 1.0, 0.9], np.float32)
        img[ys, xs] = np.maximum(img[ys, xs], b)
        for _ in range(int(rng.integers(3, 6))):  # a few big twinkling stars
            y, x = int(rng.integers(2, int(0.75 * H))), int(rng.integers(2, W - 2))
            img[y, x - 1:x + 2] = 255
            img[y - 1:y + 2, x] = 255
    elif place == "snow":
        n = int(rng.integers(35, 60))
        ys, xs = rng.integers(0, H - 1, n), rng.integers(0, W - 1, n)
        img[ys, xs] = 255
        big = rng.random(n) < 0.3
        img[ys[big] + 1, xs[big]] = 0.5 * img[ys[big] + 1, xs[big]] + 127
        img[ys[big], xs[big] + 1] = 0.5 * img[ys[big], xs[big] + 1] + 127
    elif place == "grass":
        n = int(rng.integers(12, 22))
        for _ in range(n):
            y, x = int(rng.integers(1, H - 1)), int(rng.integers(1, W - 1))
            col = _FLOWER_COLOURS[int(rng.integers(len(_FLOWER_COLOURS)))]
            img[y, x - 1:x + 2] = col
            img[y - 1:y + 2, x] = col
            img[y, x] = (255, 200, 40)
    return img


def background(place: str | None, rng: np.random.Generator) -> np.ndarray:
    """A ``(64, 64, 3) float32`` background for ``place`` (None: plain light grey), varied by ``rng``."""
    if place is not None and place not in PLACES:
        raise ValueError(f"unknown place {place!r}: choose from {', '.join(PLACES)}")
    tex = _texture(place, int(rng.integers(_VARIANTS)))
    dy = int(rng.integers(0, _TEX_H - SIDE + 1))
    dx = int(rng.integers(0, _TEX_W - SIDE + 1))
    img = tex[dy:dy + SIDE, dx:dx + SIDE]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    gain = rng.uniform(0.93, 1.07) + rng.uniform(-0.03, 0.03, 3)
    img = img * gain.astype(np.float32)
    return _decorate(place, img, rng)
