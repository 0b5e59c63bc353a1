"""Independent evaluators for the toy world: a CLIP-like image-text model and a DINO-like subject encoder.

They play the part that CLIP and DINO play for real photos (CLIP-T / CLIP-I / DINO scores, zero-shot checks of what
a generated image shows), for the 64 px images of :mod:`tuneqdm.toy.world`. Both are small CNNs trained with strong
augmentations (blur, down/up-sampling, noise, colour jitter, shifts, small warps) so that they also judge the blurry,
colour-shifted images a tiny diffusion model decodes. Weights ship in ``tuneqdm/toy/weights/`` (float16 safetensors
plus a JSON config holding the architecture, the vocabulary and the file's SHA-256); they are trained by
``python -m recipes.train_evaluators``.

Seed convention (keeps the evaluators independent of what they judge):

- the diffusion pipeline trains on world seeds ``< 10_000_000``;
- evaluator TRAINING uses seeds in ``[10_000_000, 20_000_000)`` (scenes, instances, their photos);
- evaluator GATES (``benchmarks/toy_evaluators.py``, the tests) use seeds in ``[20_000_000, 30_000_000)`` and the
  instances ``make_instance(20_000_000 + i)``;
- the pipeline's own gate prompts use seeds ``>= 30_000_000``.

``ToyCLIP``: image tower (CNN, global average+max pool, linear to 128) and text tower (word-level: a fixed vocabulary
of the world's words plus ``<unk>``, so any word such as ``sks`` or ``dog`` is accepted; one transformer block, mean
pooling, linear to 128). ``ToyDINO``: the same image CNN, started from the CLIP-like tower and trained for instance
discrimination: its embedding identifies a subject (noun, pattern, colours, marking) regardless of background and pose.
Measured gates (zero-shot class/place accuracy, instance retrieval): ``docs/benchmarks/toy_evaluators.md``. The
CLIP-like image tower sees noun, colour, material and place but hardly which instance (it was never asked to): CLIP-I
computed with it measures class-level fidelity, the DINO-like score subject fidelity.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..errors import TuneQDMError
from ..files import write_file_atomically
from .world import CLASSES, COLOURS, MATERIALS, PLACES, SIDE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLIP_FILE = "toy_clip.safetensors"
DINO_FILE = "toy_dino.safetensors"
FORMAT_VERSION = 1
SPECIALS = ("<pad>", "<unk>", "<cls>")
PAD, UNK, CLS = 0, 1, 2
_WORD = re.compile(r"[a-z]+")


def toy_vocabulary() -> tuple[str, ...]:
    """The text tower's words: the specials, the articles, nouns, colours, materials and every word of every place
    phrase (first occurrence order)."""
    words = list(SPECIALS) + ["a", "an", *CLASSES, *COLOURS, *MATERIALS]
    for phrase in PLACES.values():
        words += phrase.split()
    return tuple(dict.fromkeys(words))


# ---------------------------------------------------------------------------------------------------------------
# preprocessing


def images_to_tensor(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """PIL images or ``uint8`` arrays (``H x W x 3``, ``H x W x 4`` or ``H x W``) -> ``(N, 3, 64, 64)`` float32 in
    [0, 1]; other sizes are resized (bicubic, antialiased)."""
    out = np.empty((len(images), SIDE, SIDE, 3), np.uint8)
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            pil = im
        elif isinstance(im, np.ndarray):
            if im.dtype != np.uint8 or im.ndim not in (2, 3) or (im.ndim == 3 and im.shape[2] not in (1, 3, 4)):
                raise TuneQDMError(f"image {i} is a {im.dtype} array of shape {im.shape}: pass uint8 H x W x 3 "
                                   "arrays or PIL images")
            if im.ndim == 3 and im.shape[2] == 3 and im.shape[:2] == (SIDE, SIDE):
                out[i] = im
                continue
            pil = Image.fromarray(im[..., 0] if im.ndim == 3 and im.shape[2] == 1 else im)
        else:
            raise TuneQDMError(f"image {i} is a {type(im).__name__}: pass uint8 H x W x 3 arrays or PIL images")
        pil = pil.convert("RGB")
        if pil.size != (SIDE, SIDE):
            pil = pil.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        out[i] = np.asarray(pil)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------------------------------------------------------
# networks


def _conv(cin: int, cout: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU())


class ImageTower(nn.Module):
    """64x64 RGB in [0, 1] -> ``dim`` features: a stem at full resolution, then stages that halve the resolution
    (a strided conv and a residual conv each, GroupNorm + ReLU), global average and max pooling, linear."""

    def __init__(self, stem: int = 16, widths: Sequence[int] = (32, 64, 128, 128), dim: int = 128, groups: int = 8):
        super().__init__()
        self.stem = _conv(3, stem, 1, groups)
        self.down = nn.ModuleList()
        self.res = nn.ModuleList()
        c = stem
        for w in widths:
            self.down.append(_conv(c, w, 2, groups))
            self.res.append(_conv(w, w, 1, groups))
            c = w
        self.norm = nn.LayerNorm(2 * c)
        self.proj = nn.Linear(2 * c, dim)
        self.features = 2 * c

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem((x - 0.5) / 0.25)
        for down, res in zip(self.down, self.res):
            h = down(h)
            h = h + res(h)
        return self.norm(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(x))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        x = x + self.out(o.transpose(1, 2).reshape(b, n, d))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class TextTower(nn.Module):
    """Word ids -> ``dim`` features: embeddings + learned positions, transformer blocks, masked mean, linear."""

    def __init__(self, vocab: Sequence[str], width: int = 128, depth: int = 1, heads: int = 4, ff: int = 256,
                 max_len: int = 32, dim: int = 128):
        super().__init__()
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len
        self.tok = nn.Embedding(len(self.vocab), width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(_Block(width, heads, ff) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, L)`` int64 ids: ``<cls>`` then one id per word (lower-cased letters; unknown words -> ``<unk>``),
        padded with ``<pad>``, at most ``max_len`` ids."""
        rows = []
        for t in texts:
            if not isinstance(t, str):
                raise TuneQDMError(f"texts must be strings, got a {type(t).__name__}")
            ids = [CLS] + [self.index.get(w, UNK) for w in _WORD.findall(t.lower())]
            rows.append(ids[:self.max_len])
        length = max(len(r) for r in rows)
        out = torch.full((len(rows), length), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        valid = ids != PAD
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x, valid)
        w = valid.unsqueeze(-1).to(x.dtype)
        return self.proj(self.norm((x * w).sum(1) / w.sum(1)))


class _Encoder(nn.Module):
    name = "toy"
    batch_size = 256

    def embed_image_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 64, 64)`` floats in [0, 1] -> normalised ``(N, D)`` (differentiable; used in training)."""
        return F.normalize(self.image(x), dim=-1)

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_images(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Images -> ``(N, D)`` L2-normalised float32 CPU tensor (eval mode, no gradients)."""
        if len(images) == 0:
            raise TuneQDMError("no images to encode: pass at least one")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                chunks = [self.embed_image_tensor(images_to_tensor(images[i:i + self.batch_size]).to(self._device))
                          for i in range(0, len(images), self.batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(chunks).float().cpu()


class ToyCLIP(_Encoder):
    """CLIP-like image and text towers for the toy world (implements ``ImageTextEncoder``)."""

    name = "toy-clip"

    def __init__(self, image: dict | None = None, text: dict | None = None):
        super().__init__()
        image = dict(image or {})
        text = dict(text or {})
        text.setdefault("vocab", list(toy_vocabulary()))
        text.setdefault("dim", image.get("dim", 128))
        self.config = {"image": image, "text": text}
        self.image = ImageTower(**image)
        self.text = TextTower(**text)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def embed_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> ``(N, D)`` L2-normalised float32 CPU tensor; any words work (unknown ones read as ``<unk>``)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise TuneQDMError("no texts to encode: pass at least one")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                chunks = [self.embed_text_ids(self.text.tokenize(texts[i:i + 1024]).to(self._device))
                          for i in range(0, len(texts), 1024)]
        finally:
            self.train(was_training)
        return torch.cat(chunks).float().cpu()


class ToyDINO(_Encoder):
    """DINO-like subject encoder for the toy world (implements ``ImageEncoder``)."""

    name = "toy-dino"

    def __init__(self, image: dict | None = None):
        super().__init__()
        image = dict(image or {})
        self.config = {"image": image}
        self.image = ImageTower(**image)


# ---------------------------------------------------------------------------------------------------------------
# files: <name>.safetensors (float16) + <name>.json (kind, architecture, sha256 of the weights, training summary)

_KINDS = {"toy-clip": ToyCLIP, "toy-dino": ToyDINO}


def _weights_error(path: Path) -> TuneQDMError:
    return TuneQDMError(f"toy evaluator weights {path} are missing or corrupted: reinstall tuneqdm "
                        "(pip install --force-reinstall tuneqdm)")


def save_evaluator(model: ToyCLIP | ToyDINO, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``path`` (float16 safetensors) and its JSON config next to it (``.json``), each atomically."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={"kind": model.name, "format_version": str(FORMAT_VERSION)})
    config = {"kind": model.name, "format_version": FORMAT_VERSION, "dtype": "float16", **model.config,
              "sha256": hashlib.sha256(data).hexdigest(), **(extra or {})}
    write_file_atomically(path, data)
    write_file_atomically(path.with_suffix(".json"), (json.dumps(config, indent=1) + "\n").encode())
    return path


def _load(kind: str, path: str | os.PathLike | None, default: str):
    from safetensors.torch import load

    path = WEIGHTS_DIR / default if path is None else Path(path)
    if path.is_dir():
        path = path / default
    try:
        config = json.loads(path.with_suffix(".json").read_text())
        data = path.read_bytes()
        if config["kind"] != kind or config["format_version"] != FORMAT_VERSION:
            raise ValueError("wrong kind or version")
        if hashlib.sha256(data).hexdigest() != config["sha256"]:
            raise ValueError("checksum mismatch")
        tensors = load(data)
        if kind == "toy-clip":
            model = ToyCLIP(image=config["image"], text=config["text"])
        else:
            model = ToyDINO(image=config["image"])
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except Exception:  # any unreadable, truncated, altered or mismatched file
        raise _weights_error(path) from None
    model.train_config = config
    return model.eval().requires_grad_(False)


def load_toy_clip(path: str | os.PathLike | None = None) -> ToyCLIP:
    """The shipped CLIP-like evaluator (or the one at ``path``: a ``.safetensors`` file or a folder holding
    ``toy_clip.safetensors``), in eval mode on the CPU."""
    return _load("toy-clip", path, CLIP_FILE)


def load_toy_dino(path: str | os.PathLike | None = None) -> ToyDINO:
    """The shipped DINO-like evaluator (or the one at ``path``), in eval mode on the CPU."""
    return _load("toy-dino", path, DINO_FILE)


# ---------------------------------------------------------------------------------------------------------------
# zero-shot label prompts (used by the benchmark and the tests; documented there)


def class_prompts() -> list[list[str]]:
    """For each noun: ``"a {noun}"`` and ``"a {noun} {phrase}"`` for every place phrase (an ensemble)."""
    return [[f"a {n}"] + [f"a {n} {p}" for p in PLACES.values()] for n in CLASSES]


def place_prompts() -> list[list[str]]:
    """For each place: ``"a {noun} {phrase}"`` for every noun."""
    return [[f"a {n} {p}" for n in CLASSES] for p in PLACES.values()]


def colour_prompts() -> list[list[str]]:
    """For each colour: ``"a {colour} {noun}"`` for every noun."""
    return [[f"a {c} {n}" for n in CLASSES] for c in COLOURS]


def material_prompts() -> list[list[str]]:
    """For each material: ``"a {material} {noun}"`` (``"an"`` before a vowel) for every noun."""
    return [[("an " if m[0] in "aeiou" else "a ") + f"{m} {n}" for n in CLASSES] for m in MATERIALS]
