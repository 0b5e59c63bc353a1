"""The encoder interface every evaluator implements, and the DreamBooth metrics written against it.

An image encoder maps images (PIL images or ``uint8`` ``H x W x 3`` arrays) to L2-normalised ``float32`` rows; an
image-text encoder also maps texts into the same space. The toy world's evaluators (:mod:`tuneqdm.toy.evaluators`)
and wrappers of the real DINO/CLIP models implement these protocols, so the metrics below work with either:

- DINO score: mean cosine over all (real, generated) pairs of a subject-fidelity encoder's image embeddings;
- CLIP-I score: the same with a CLIP-like image tower;
- CLIP-T score: mean cosine between each generated image and the prompt it was generated from.
"""

from __future__ import annotations

from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..errors import TuneQDMError

ImageLike = Union[Image.Image, np.ndarray]


@runtime_checkable
class ImageEncoder(Protocol):
    """Images -> ``(N, D)`` L2-normalised ``float32`` embeddings (on the CPU)."""

    name: str

    def encode_images(self, images: Sequence[ImageLike]) -> torch.Tensor: ...


@runtime_checkable
class ImageTextEncoder(ImageEncoder, Protocol):
    """An :class:`ImageEncoder` with a text tower embedding texts into the same space."""

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` cosines between the rows of ``a (N, D)`` and ``b (M, D)`` (re-normalised, so any rows work)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise TuneQDMError(f"cosine_matrix needs (N, D) and (M, D) embeddings, got {tuple(a.shape)} and "
                           f"{tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def _nonempty(name: str, items: Sequence) -> None:
    if len(items) == 0:
        raise TuneQDMError(f"{name} is empty: pass at least one")


def dino_score(enc: ImageEncoder, real: Sequence[ImageLike], generated: Sequence[ImageLike]) -> float:
    """Mean pairwise cosine between the embeddings of the ``real`` subject photos and the ``generated`` images."""
    _nonempty("real", real)
    _nonempty("generated", generated)
    return float(cosine_matrix(enc.encode_images(real), enc.encode_images(generated)).mean())


def clip_i_score(enc: ImageTextEncoder, real: Sequence[ImageLike], generated: Sequence[ImageLike]) -> float:
    """CLIP-I: :func:`dino_score` computed with a CLIP-like image tower."""
    return dino_score(enc, real, generated)


def clip_t_score(enc: ImageTextEncoder, images: Sequence[ImageLike], prompts: Sequence[str]) -> float:
    """CLIP-T: mean cosine between ``images[i]`` and ``prompts[i]``."""
    _nonempty("images", images)
    if len(images) != len(prompts):
        raise TuneQDMError(f"clip_t_score needs one prompt per image, got {len(images)} images and "
                           f"{len(prompts)} prompts")
    return float((enc.encode_images(images) * enc.encode_texts(list(prompts))).sum(-1).mean())


def text_prototypes(enc: ImageTextEncoder, label_texts: Sequence[str | Sequence[str]]) -> torch.Tensor:
    """One normalised embedding per label; a label given as several texts (a prompt ensemble) is the normalised
    mean of their embeddings."""
    _nonempty("label_texts", label_texts)
    groups = [[t] if isinstance(t, str) else list(t) for t in label_texts]
    for g in groups:
        _nonempty("a label's prompt list", g)
    flat = [t for g in groups for t in g]
    emb = enc.encode_texts(flat)
    out, i = [], 0
    for g in groups:
        out.append(emb[i:i + len(g)].mean(0))
        i += len(g)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def zero_shot_classify(enc: ImageTextEncoder, images: Sequence[ImageLike],
                       label_texts: Sequence[str | Sequence[str]]) -> torch.Tensor:
    """``(N,)`` int64: for each image the index of the label whose text (or prompt ensemble) is closest."""
    _nonempty("images", images)
    protos = text_prototypes(enc, label_texts)
    return (enc.encode_images(images) @ protos.T).argmax(-1)
