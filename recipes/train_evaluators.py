"""Train the toy world's evaluators (:mod:`tuneqdm.toy.evaluators`) on CPU, one thread.

    OMP_NUM_THREADS=1 python -m recipes.train_evaluators --which both --out tuneqdm/toy/weights

Everything is seeded from world seeds in ``[10_000_000, 20_000_000)`` (the evaluator-training range; see the module
docstring of :mod:`tuneqdm.toy.evaluators`). Each model trains for ``--clip-steps`` / ``--dino-steps`` steps or
``--minutes`` minutes of optimisation, whichever comes first (plus about a minute to render its data); the
learning-rate schedule follows ``max(step / steps, elapsed / budget)``, so a run that the clock does not cut is
deterministic. Loss, validation numbers (training-range validation seeds) and wall time are printed and written to
``train_log_{clip,dino}.json`` next to the weights; weights are written atomically.

CLIP-like recipe: a pool of rendered scenes (every attribute known) plus photos of unique instances (captioned without
colour unless recoloured, sometimes with the unknown token ``sks``). Each step samples a batch in which 3/8 share two
nouns and three places (hard negatives: same noun other place or colour, same place other noun), 1/4 are instance
photos, draws a caption per image with attributes randomly left out, and minimises a symmetric InfoNCE whose targets
are *every* caption in the batch that truly describes an image (a caption without a colour word describes objects of
every colour), plus auxiliary noun / colour / material / place heads on the image features (training only; zero-shot
goes through the text tower).

DINO-like recipe: starts from the CLIP-like image tower (``--dino-init``; from scratch, 1000 steps reach only about
93 % retrieval top-1, from the CLIP-like tower about 98 %), then instance discrimination on a pool of instances
photographed in 6 views each (pose, size and place differ); each step takes 32 instances x 4 views (every other step
instances of only three nouns: hard negatives that differ in colours, pattern or marking) and minimises a
supervised-contrastive loss (temperature ``--tau``) plus an auxiliary noun loss. ``--dino-family K > 1`` adds, per base
instance, K - 1 siblings that differ in exactly one attribute (noun, pattern, colours or marking) as hard negatives in
the same batch (from scratch this did not help: 89 % vs 93 %).

Both: strong augmentations simulating a tiny diffusion model's decoded images (Gaussian blur, down/up-sampling,
noise, colour jitter, shifts, small scale/rotation and smooth warps).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneqdm.errors import TuneQDMError
from tuneqdm.eval.encoders import text_prototypes
from tuneqdm.files import write_file_atomically
from tuneqdm.toy.evaluators import (CLIP_FILE, DINO_FILE, ToyCLIP, ToyDINO, class_prompts, load_toy_clip, place_prompts, save_evaluator)
from tuneqdm.toy.subjects import MARKINGS, PATTERNS, TOKEN, Instance, make_instance
from tuneqdm.toy.world import CLASSES, COLOURS, MARK_ANCHORS, MATERIALS, PLACES, Scene, caption, render, sample_pose, seed_entropy

TRAIN_SEED = 10_000_000
VAL_SEED = 19_000_000
PLACE_KEYS: tuple = (None, *PLACES)  # index 0: the plain background
COLOUR_KEYS = tuple(COLOURS)
NONE_COLOUR = len(COLOUR_KEYS)  # metal objects and un-recoloured instances: no colour word describes them
MATERIAL_KEYS: tuple = (None, *MATERIALS)


def _rng(*salt) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed_entropy(TRAIN_SEED, "evaluators", *map(str, salt))))


# ---------------------------------------------------------------------------------------------------------------
# data pools


def clip_pool(n_scenes: int, n_instances: int, views: int) -> dict:
    """Rendered scenes with their attributes: plain objects, then ``n_instances`` instances x ``views`` photos."""
    rng = _rng("clip", "scenes")
    total = n_scenes + n_instances * views
    images = np.empty((total, 64, 64, 3), np.uint8)
    attrs = np.empty((total, 5), np.int64)  # noun, colour, material, place, is_instance
    scenes: list[Scene] = []
    for i in range(n_scenes):
        noun = int(rng.integers(len(CLASSES)))
        material = int(rng.integers(1, 4)) if rng.random() < 0.3 else 0
        colour = NONE_COLOUR if MATERIAL_KEYS[material] == "metal" else int(rng.integers(len(COLOUR_KEYS)))
        place = int(rng.integers(len(PLACE_KEYS)))
        pose = sample_pose(rng, CLASSES[noun])
        scene = Scene(CLASSES[noun], None if colour == NONE_COLOUR else COLOUR_KEYS[colour],
                      MATERIAL_KEYS[material], PLACE_KEYS[place], *_pose_fields(pose))
        images[i] = render(scene, rng)
        attrs[i] = (noun, colour, material, place, 0)
        scenes.append(scene)
    i = n_scenes
    for k in range(n_instances):
        inst = make_instance(TRAIN_SEED + 2_000_000 + k)
        noun = CLASSES.index(inst.noun)
        for _ in range(views):
            material = int(rng.integers(1, 4)) if rng.random() < 0.2 else 0
            colour = int(rng.integers(len(COLOUR_KEYS))) if rng.random() < 0.25 else NONE_COLOUR
            if MATERIAL_KEYS[material] == "metal":
                colour = NONE_COLOUR
            place = int(rng.integers(len(PLACE_KEYS)))
            pose = sample_pose(rng, inst.noun, size_range=(0.45, 0.72))
            scene = Scene(inst.noun, None if colour == NONE_COLOUR else COLOUR_KEYS[colour], MATERIAL_KEYS[material],
                          PLACE_KEYS[place], *_pose_fields(pose), instance=inst)
            images[i] = render(scene, rng)
            attrs[i] = (noun, colour, material, place, 1)
            scenes.append(scene)
            i += 1
    return {"images": images, "attrs": attrs, "scenes": scenes}


def _pose_fields(pose):
    size, x, y, angle, flip = pose
    return x, y, size, angle, flip


def sibling(inst: Instance, change: str, rng: np.random.Generator, donor: Instance) -> Instance:
    """A different instance that shares everything with ``inst`` except one attribute (``"noun"``, ``"pattern"``,
    ``"colours"`` or ``"marking"``); ``donor`` (another instance) supplies new colours."""
    if change == "noun":
        noun = CLASSES[(CLASSES.index(inst.noun) + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)]
        anchors = MARK_ANCHORS[noun]
        ax, ay, amax = anchors[int(rng.integers(len(anchors)))]
        return replace(inst, noun=noun, marking_pos=(ax, ay), marking_size=round(float(amax * rng.uniform(0.85, 1)), 4))
    if change == "pattern":
        pattern = PATTERNS[(PATTERNS.index(inst.pattern) + int(rng.integers(1, len(PATTERNS)))) % len(PATTERNS)]
        return replace(inst, pattern=pattern, pattern_scale=round(float(rng.uniform(0.38, 0.62)), 4),
                       pattern_angle=round(float(rng.uniform(0.0, 180.0)), 2))
    if change == "colours":
        return replace(inst, primary=donor.primary, secondary=donor.secondary)
    if change == "marking":
        marking = MARKINGS[(MARKINGS.index(inst.marking) + int(rng.integers(1, len(MARKINGS)))) % len(MARKINGS)]
        return replace(inst, marking=marking, marking_colour=donor.marking_colour)
    raise ValueError(change)


SIBLING_CHANGES = ("noun", "pattern", "colours", "marking")


def dino_pool(n_families: int, family: int, views: int, first_seed: int) -> dict:
    """``n_families`` families of ``family`` instances: ``make_instance(first_seed + k)`` and siblings that differ
    from it in one attribute (noun, pattern, colours or marking: hard negatives), ``views`` photos each (new pose,
    size and place per photo). With ``family == 1``: independent instances."""
    rng = _rng("dino", first_seed, "views")
    n = n_families * family
    images = np.empty((n * views, 64, 64, 3), np.uint8)
    nouns = np.empty(n, np.int64)
    for k in range(n_families):
        base = make_instance(first_seed + k)
        donor = make_instance(first_seed + 5_000_000 - 1 - k)
        changes = rng.permutation(len(SIBLING_CHANGES))[:family - 1]
        members = [base] + [sibling(base, SIBLING_CHANGES[int(c)], rng, donor) for c in changes]
        for m, inst in enumerate(members):
            i = k * family + m
            nouns[i] = CLASSES.index(inst.noun)
            places = rng.permutation(len(PLACE_KEYS))[:views]
            for v in range(views):
                pose = sample_pose(rng, inst.noun, size_range=(0.45, 0.72))
                scene = Scene(inst.noun, None, None, PLACE_KEYS[int(places[v])], *_pose_fields(pose), instance=inst)
                images[i * views + v] = render(scene, rng)
    return {"images": images, "nouns": nouns, "views": views, "family": family}


# ---------------------------------------------------------------------------------------------------------------
# augmentations (batched, torch)


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur (``sigma``: ``(B,)``, > 0), reflect padding."""
    b, c, h, w = x.shape
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None].clamp_min(1e-3)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random geometric, colour and degradation augmentations of ``(B, 3, 64, 64)`` images in [0, 1]."""
    b = x.shape[0]
    # geometry: shift up to 4 px, scale 0.9-1.1, rotation up to 10 degrees, smooth warp of up to ~1 px
    ang = _u(g, b, -10, 10) * math.pi / 180
    sc = _u(g, b, 0.9, 1.1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.cos(ang) / sc
    theta[:, 0, 1] = -torch.sin(ang) / sc
    theta[:, 1, 0] = torch.sin(ang) / sc
    theta[:, 1, 1] = torch.cos(ang) / sc
    theta[:, :, 2] = (torch.rand(b, 2, generator=g) * 2 - 1) * (4 / 32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warp = torch.randn(b, 2, 4, 4, generator=g) * _u(g, b, 0, 0.03)[:, None, None, None]
    grid = grid + F.interpolate(warp, size=x.shape[2:], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    keep = torch.rand(b, generator=g) < 0.15
    grid[keep] = F.affine_grid(torch.eye(2, 3).expand(int(keep.sum()), 2, 3), [int(keep.sum()), *x.shape[1:]],
                               align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # colour: brightness, contrast, saturation, per-channel gain
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * _u(g, b, 0.85, 1.15)[:, None, None, None] + mean
    grey = x.mean(1, keepdim=True)
    x = (x - grey) * _u(g, b, 0.8, 1.2)[:, None, None, None] + grey
    x = x * _u(g, b, 0.9, 1.1)[:, None, None, None] * (1 + (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 0.12)
    # degradations: blur, down/up-sampling, noise (each with probability 1/2)
    blur = torch.rand(b, generator=g) < 0.5
    if blur.any():
        x[blur] = gaussian_blur(x[blur], _u(g, int(blur.sum()), 0.4, 1.6))
    size = torch.randint(0, 8, (b,), generator=g)
    for s, side in enumerate((16, 24, 32, 40)):
        m = size == s
        if m.any():
            small = F.interpolate(x[m], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            x[m] = F.interpolate(small, size=x.shape[2:], mode="bicubic" if s % 2 else "bilinear",
                                 align_corners=False)
    noisy = torch.rand(b, generator=g) < 0.5
    sigma = _u(g, b, 0.0, 0.06) * noisy
    x = x + torch.randn(x.shape, generator=g) * sigma[:, None, None, None]
    return x.clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# training loop helpers


def _optimizer(model: nn.Module, lr: float, wd: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "tok" not in name and "pos" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _lr(progress: float, base: float, warmup: float = 0.05) -> float:
    if progress < warmup:
        return base * progress / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def _to_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous(
        memory_format=torch.channels_last)


class _Log:
    def __init__(self, path: Path, header: dict):
        self.path, self.t0 = path, time.time()
        self.data = {**header, "records": []}

    def record(self, **kw) -> None:
        kw["wall_s"] = round(time.time() - self.t0, 1)
        self.data["records"].append(kw)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()), flush=True)

    def write(self, **kw) -> None:
        self.data.update(kw)
        self.data["total_wall_s"] = round(time.time() - self.t0, 1)
        write_file_atomically(self.path, json.dumps(self.data, indent=1) + "\n")


def _degrade_fixed(images: np.ndarray, seed: int) -> np.ndarray:
    """A fixed mid-strength degradation for validation (blur 1.0, down to 32 px and back, noise 0.03)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = gaussian_blur(x, torch.full((x.shape[0],), 1.0))
    x = F.interpolate(F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True), size=(64, 64),
                      mode="bilinear")
    x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return (x * 255 + 0.5).byte().permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------------------------
# CLIP-like


def _caption_batch(attrs: np.ndarray, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """One caption per image with attributes randomly left out; returns texts and their attributes (-1: absent)."""
    texts, tattrs = [], np.empty((len(attrs), 4), np.int64)
    for j, (noun, colour, material, place, inst) in enumerate(attrs):
        tc = colour if colour != NONE_COLOUR and rng.random() < 0.75 else -1
        tm = material if material > 0 and rng.random() < 0.85 else -1
        tp = place if place > 0 and rng.random() < 0.8 else -1
        if tm > 0 and MATERIAL_KEYS[tm] == "metal":
            tc = -1
        token = TOKEN if rng.random() < (0.5 if inst else 0.05) else None
        scene = Scene(CLASSES[noun], COLOUR_KEYS[tc] if tc >= 0 else None, MATERIAL_KEYS[tm] if tm > 0 else None,
                      PLACE_KEYS[tp] if tp > 0 else None, 0.5, 0.5, 0.5, 0.0, False)
        texts.append(caption(scene, token))
        tattrs[j] = (noun, tc, tm, tp)
    return texts, tattrs


def _matches(tattrs: np.ndarray, attrs: np.ndarray) -> torch.Tensor:
    """``(T, I)`` bool: caption t truly describes image i (absent attributes describe anything)."""
    t = torch.from_numpy(tattrs)[:, None, :]
    a = torch.from_numpy(attrs[:, :4])[None, :, :]
    ok = (t[..., 0] == a[..., 0])
    for k in (1, 2, 3):
        ok &= (t[..., k] < 0) | (t[..., k] == a[..., k])
    return ok


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    tgt = targets.float() / targets.float().sum(1, keepdim=True)
    return -(tgt * F.log_softmax(logits, 1)).sum(1).mean()


class _ClipHeads(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.noun = nn.Linear(features, len(CLASSES))
        self.colour = nn.Linear(features, len(COLOUR_KEYS) + 1)
        self.material = nn.Linear(features, len(MATERIAL_KEYS))
        self.place = nn.Linear(features, len(PLACE_KEYS))

    def forward(self, h, attrs):
        """Half the weight on the noun (the hardest attribute to see), half shared by colour, material, place."""
        others = (F.cross_entropy(self.colour(h), attrs[:, 1]) + F.cross_entropy(self.material(h), attrs[:, 2])
                  + F.cross_entropy(self.place(h), attrs[:, 3])) / 3
        return 0.5 * F.cross_entropy(self.noun(h), attrs[:, 0]) + 0.5 * others


def _val_scenes(n: int) -> tuple[np.ndarray, list[Scene]]:
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(VAL_SEED, "evaluators-val")))
    images, scenes = np.empty((n, 64, 64, 3), np.uint8), []
    for i in range(n):
        noun = CLASSES[int(rng.integers(len(CLASSES)))]
        place = tuple(PLACES)[int(rng.integers(len(PLACES)))]
        colour = COLOUR_KEYS[int(rng.integers(len(COLOUR_KEYS)))]
        scene = Scene(noun, colour, None, place, *_pose_fields(sample_pose(rng, noun)))
        images[i] = render(scene, rng)
        scenes.append(scene)
    return images, scenes


def _clip_val(model: ToyCLIP, images: np.ndarray, scenes: list[Scene]) -> dict:
    out = {}
    cls = text_prototypes(model, class_prompts())
    plc = text_prototypes(model, place_prompts())
    nouns = torch.tensor([CLASSES.index(s.noun) for s in scenes])
    places = torch.tensor([tuple(PLACES).index(s.place) for s in scenes])
    for name, imgs in (("clean", images), ("degraded", _degrade_fixed(images, 1))):
        emb = model.encode_images(imgs)
        out[f"class_{name}"] = float(((emb @ cls.T).argmax(1) == nouns).float().mean())
        out[f"place_{name}"] = float(((emb @ plc.T).argmax(1) == places).float().mean())
    return out


def _clip_batch(rng: np.random.Generator, attrs: np.ndarray, plain: np.ndarray, inst: np.ndarray, b: int):
    """Pool indices of one CLIP-like batch of ``b``: a quarter instance photos, up to 3/8 hard negatives (plain
    scenes of two nouns in three places), the rest plain scenes."""
    n_inst, n_hard = b // 4, (3 * b) // 8
    nouns = rng.choice(len(CLASSES), 2, replace=False)
    places = rng.choice(len(PLACE_KEYS), 3, replace=False)
    cand = plain[np.isin(attrs[plain, 0], nouns) & np.isin(attrs[plain, 3], places)]
    hard = rng.choice(cand, min(n_hard, len(cand)), replace=False)
    return np.concatenate([hard, rng.choice(plain, b - len(hard) - n_inst, replace=False),
                           rng.choice(inst, n_inst, replace=False)])


def train_clip(args, out: Path) -> dict:
    torch.manual_seed(args.seed)
    rng = _rng("clip-batches", args.seed)
    g = torch.Generator().manual_seed(args.seed)
    log = _Log(out / "train_log_clip.json", {"which": "clip", "argv": sys.argv, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}})
    pool = clip_pool(args.clip_scenes, args.clip_instances, 4)
    vimg, vscenes = _val_scenes(400)
    attrs = pool["attrs"]
    plain = np.flatnonzero(attrs[:, 4] == 0)
    inst = np.flatnonzero(attrs[:, 4] == 1)
    log.record(stage="data", images=len(attrs))

    model = ToyCLIP(image=dict(stem=16, widths=[32, 64, 128, 128], dim=128))
    model.image.to(memory_format=torch.channels_last)
    heads = _ClipHeads(model.image.features)
    params = nn.ModuleList([model, heads])
    opt = _optimizer(params, args.clip_lr, 0.05)
    budget = args.minutes * 60
    t0, step = time.time(), 0
    while True:
        progress = max(step / args.clip_steps, (time.time() - t0) / budget)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = _lr(progress, args.clip_lr)
        idx = _clip_batch(rng, attrs, plain, inst, args.batch)
        a = attrs[idx]
        texts, tattrs = _caption_batch(a, rng)
        x = augment(_to_batch(pool["images"][idx]), g).contiguous(memory_format=torch.channels_last)
        h = model.image.pooled(x)
        img = F.normalize(model.image.proj(h), dim=-1)
        txt = model.embed_text_ids(model.text.tokenize(texts))
        scale = model.logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * txt @ img.T  # (T, I)
        match = _matches(tattrs, a)
        contrastive = 0.5 * (_soft_ce(logits, match) + _soft_ce(logits.T, match.T))
        aux = heads(h, torch.from_numpy(a))
        loss = contrastive + args.clip_aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            log.record(step=step, loss=contrastive.item(), aux=aux.item(), scale=scale.item(),
                       lr=opt.param_groups[0]["lr"])
        if step % args.val_every == 0:
            log.record(step=step, **_clip_val(model, vimg, vscenes))
            log.write()
    train_s = time.time() - t0
    val = _clip_val(model, vimg, vscenes)
    log.record(step=step, final=True, **val)
    summary = {"steps": step, "train_s": round(train_s, 1), "wall_s": round(time.time() - log.t0, 1), "val": val,
               "seed": args.seed, "command": "python -m recipes.train_evaluators " + " ".join(sys.argv[1:])}
    save_evaluator(model, out / CLIP_FILE, {"training": summary})
    log.write(summary=summary)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# DINO-like


def _supcon(emb: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    sim = emb @ emb.T / tau
    eye = torch.eye(len(labels), dtype=torch.bool)
    sim = sim.masked_fill(eye, float("-inf"))
    pos = (labels[:, None] == labels[None, :]) & ~eye
    logp = F.log_softmax(sim, 1).masked_fill(~pos, 0.0)
    return -(logp.sum(1) / pos.sum(1)).mean()


def _dino_val(model: ToyDINO, pool: dict) -> dict:
    v = pool["views"]
    images = pool["images"]
    out = {}
    for name, imgs in (("clean", images), ("degraded", _degrade_fixed(images, 2))):
        emb = model.encode_images(imgs).view(-1, v, 128)
        gallery, queries = emb[:, 0], emb[:, 1:].reshape(-1, 128)
        truth = torch.arange(len(gallery)).repeat_interleave(v - 1)
        out[f"top1_{name}"] = float(((queries @ gallery.T).argmax(1) == truth).float().mean())
    return out


def _dino_init_path(args) -> Path | None:
    if str(args.dino_init).lower() == "none":
        return None
    path = args.out / CLIP_FILE if args.dino_init == "auto" else Path(args.dino_init)
    if not path.is_file():
        raise TuneQDMError(f"no CLIP-like weights at {path} to start the DINO-like tower from: train them first "
                           "(--which both) or pass --dino-init PATH or --dino-init none")
    return path


def _dino_batch(rng: np.random.Generator, hard: bool, by_noun: list, n_fam: int, family: int, views: int, nv: int,
                n_pick: int) -> tuple[np.ndarray, np.ndarray]:
    """(instances, pool indices) of one DINO-like batch: ``n_pick`` whole families (``hard``: of three nouns only,
    so same-noun instances of other colours, patterns or markings are the negatives), ``nv`` views of each."""
    if hard:
        cand = np.concatenate([by_noun[k] for k in rng.choice(len(CLASSES), 3, replace=False)])
        fams = rng.choice(cand, min(n_pick, len(cand)), replace=False)
    else:
        fams = rng.choice(n_fam, n_pick, replace=False)
    inst = (fams[:, None] * family + np.arange(family)[None, :]).reshape(-1)
    vsel = np.stack([rng.choice(views, nv, replace=False) for _ in inst])
    return inst, (inst[:, None] * views + vsel).reshape(-1)


def train_dino(args, out: Path) -> dict:
    init = _dino_init_path(args)
    torch.manual_seed(args.seed)
    rng = _rng("dino-batches", args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    log = _Log(out / "train_log_dino.json", {"which": "dino", "argv": sys.argv, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}})
    views, family = args.dino_views, args.dino_family
    pool = dino_pool(args.dino_families, family, views, TRAIN_SEED + 5_000_000)
    val = dino_pool(100, 1, 4, VAL_SEED)
    log.record(stage="data", images=len(pool["images"]))
    n_fam = args.dino_families
    base_nouns = pool["nouns"][::family]
    by_noun = [np.flatnonzero(base_nouns == k) for k in range(len(CLASSES))]

    model = ToyDINO(image=dict(stem=16, widths=[32, 64, 128, 128], dim=128))
    if init is not None:  # start from a trained CLIP-like image tower
        model.image.load_state_dict(load_toy_clip(init).image.state_dict())
    model.image.to(memory_format=torch.channels_last)
    noun_head = nn.Linear(model.image.features, len(CLASSES))
    params = nn.ModuleList([model, noun_head])
    opt = _optimizer(params, args.dino_lr, 0.05)
    budget = args.minutes * 60
    t0, step = time.time(), 0
    while True:
        progress = max(step / args.dino_steps, (time.time() - t0) / budget)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = _lr(progress, args.dino_lr)
        nv = 4
        inst, idx = _dino_batch(rng, step % 2 == 1, by_noun, n_fam, family, views, nv, args.batch // (nv * family))
        labels = torch.from_numpy(np.repeat(np.arange(len(inst)), nv))
        x = augment(_to_batch(pool["images"][idx]), g).contiguous(memory_format=torch.channels_last)
        h = model.image.pooled(x)
        emb = F.normalize(model.image.proj(h), dim=-1)
        con = _supcon(emb, labels, args.tau)
        aux = F.cross_entropy(noun_head(h), torch.from_numpy(pool["nouns"][np.repeat(inst, nv)]))
        loss = con + args.dino_aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            log.record(step=step, loss=con.item(), aux=aux.item(), lr=opt.param_groups[0]["lr"])
        if step % args.val_every == 0:
            log.record(step=step, **_dino_val(model, val))
            log.write()
    train_s = time.time() - t0
    v = _dino_val(model, val)
    log.record(step=step, final=True, **v)
    summary = {"steps": step, "train_s": round(train_s, 1), "wall_s": round(time.time() - log.t0, 1), "val": v,
               "seed": args.seed, "command": "python -m recipes.train_evaluators " + " ".join(sys.argv[1:])}
    save_evaluator(model, out / DINO_FILE, {"training": summary})
    log.write(summary=summary)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.train_evaluators", description=__doc__.split("\n")[0])
    ap.add_argument("--which", choices=("clip", "dino", "both"), default="both")
    ap.add_argument("--minutes", type=float, default=13.0, help="optimisation time budget per model")
    ap.add_argument("--clip-steps", type=int, default=1200, help="CLIP-like step budget")
    ap.add_argument("--dino-steps", type=int, default=1000, help="DINO-like step budget")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--clip-lr", type=float, default=3e-3)
    ap.add_argument("--dino-lr", type=float, default=2e-3)
    ap.add_argument("--clip-aux", type=float, default=1.0, help="weight of the CLIP-like auxiliary heads' loss")
    ap.add_argument("--dino-aux", type=float, default=0.5, help="weight of the DINO-like auxiliary noun loss")
    ap.add_argument("--tau", type=float, default=0.1, help="DINO-like contrastive temperature")
    ap.add_argument("--clip-scenes", type=int, default=30000)
    ap.add_argument("--clip-instances", type=int, default=1500, help="instances (x4 photos) in the CLIP pool")
    ap.add_argument("--dino-families", type=int, default=4000, help="instance families in the DINO pool")
    ap.add_argument("--dino-family", type=int, default=1, help="instances per family (a base and its siblings)")
    ap.add_argument("--dino-views", type=int, default=6, help="photos per instance in the DINO pool")
    ap.add_argument("--dino-init", default="auto",
                    help="CLIP-like weights to start the DINO-like tower from; 'auto': the ones in --out (trained "
                         "first by --which both); 'none': from scratch")
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.which == "dino":
            _dino_init_path(args)  # fail before rendering anything
        if args.which in ("clip", "both"):
            s = train_clip(args, args.out)
            print(f"clip: {s['steps']} steps, {s['wall_s']} s, val {s['val']}", flush=True)
        if args.which in ("dino", "both"):
            s = train_dino(args, args.out)
            print(f"dino: {s['steps']} steps, {s['wall_s']} s, val {s['val']}", flush=True)
    except TuneQDMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
