"""The real DreamBooth evaluators, through transformers: DINO ViT-S/16 (CLS token) and CLIP ViT-B/32.

Both implement :mod:`tuneqdm.eval.encoders`' interface, so the DINO / CLIP-I / CLIP-T metrics run unchanged on them
or on the toy world's evaluators. Ids are configurable; a model that cannot be loaded (no network, no cache) is a
one-line error that names the offline alternative.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import TuneQDMError
from .encoders import ImageLike

DINO_ID = "facebook/dino-vits16"
CLIP_ID = "openai/clip-vit-base-patch32"


def _load(loader, model_id: str, what: str):
    try:
        return loader(model_id)
    except (OSError, ValueError):
        raise TuneQDMError(f"cannot load the {what} evaluator {model_id!r} (not a cached or reachable model id): "
                           "connect to the Hugging Face Hub once to cache it, or pass --evaluator toy") from None


def _rgb(images: Sequence[ImageLike]):
    from PIL import Image

    return [im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(im).convert("RGB") for im in images]


def _features(out) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x an output whose ``pooler_output`` holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _Encoder:
    """What both encoders share: the model id as name, a device, and batched, normalised embeddings."""

    def __init__(self, model_id: str, device: str | torch.device, batch_size: int, what: str):
        from transformers import AutoImageProcessor

        self.name = model_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.processor = _load(AutoImageProcessor.from_pretrained, model_id, what)

    def _batched(self, items: list, embed) -> torch.Tensor:
        rows = [torch.nn.functional.normalize(embed(items[i:i + self.batch_size]).float(), dim=-1).cpu()
                for i in range(0, len(items), self.batch_size)]
        return torch.cat(rows)

    def _pixels(self, images) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)


class DinoEncoder(_Encoder):
    """Subject fidelity: the L2-normalised CLS token of a self-supervised ViT (DreamBooth's DINO score)."""

    def __init__(self, model_id: str = DINO_ID, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import ViTModel

        super().__init__(model_id, device, batch_size, "DINO")
        self.model = _load(lambda i: ViTModel.from_pretrained(i, add_pooling_layer=False), model_id, "DINO")
        self.model.eval().to(self.device)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return self._batched(_rgb(images), lambda b: self.model(pixel_values=self._pixels(b)).last_hidden_state[:, 0])


class ClipEncoder(_Encoder):
    """CLIP-I and CLIP-T: L2-normalised projected image and text embeddings of a CLIP model."""

    def __init__(self, model_id: str = CLIP_ID, device: str | torch.device = "cpu", batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        super().__init__(model_id, device, batch_size, "CLIP")
        self.tokenizer = _load(AutoTokenizer.from_pretrained, model_id, "CLIP")
        self.model = _load(CLIPModel.from_pretrained, model_id, "CLIP")
        self.model.eval().to(self.device)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return self._batched(_rgb(images),
                             lambda b: _features(self.model.get_image_features(pixel_values=self._pixels(b))))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        def embed(batch):
            tok = self.tokenizer(batch, padding=True, truncation=True, return_tensors="pt",
                                 max_length=self.model.config.text_config.max_position_embeddings)
            return _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                          attention_mask=tok["attention_mask"].to(self.device)))

        return self._batched(list(texts), embed)
