"""Evaluators: the encoder interface and the DreamBooth metrics (DINO, CLIP-I, CLIP-T); the real DINO/CLIP
encoders live in :mod:`tuneqdm.eval.real` (imported on use: they need transformers' model code)."""

from .encoders import (ImageEncoder, ImageTextEncoder, clip_i_score, clip_t_score, cosine_matrix, dino_score,
                       text_prototypes, zero_shot_classify)

__all__ = ["ImageEncoder", "ImageTextEncoder", "clip_i_score", "clip_t_score", "cosine_matrix", "dino_score",
           "text_prototypes", "zero_shot_classify"]
