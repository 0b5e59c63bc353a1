"""Tiny random diffusers pipelines (SD-1.x style and SDXL), built in code and saved to a folder for the train/generate
tests. The tokenizer is a real ``CLIPTokenizer`` over a few dozen byte-level symbols (no merges), so any lowercase
prompt tokenizes, letter by letter."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

MAX_LEN = 16


def tiny_tokenizer(folder: Path | None = None):
    """A ``CLIPTokenizer`` over single characters (built in ``folder``, or in a temporary one)."""
    from transformers import CLIPTokenizer

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return tiny_tokenizer(Path(tmp))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-<>")
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LEN)


def _text_encoder(vocab_size, hidden, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=projection or hidden,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         sample_size=32)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusionPipeline`` (UNet (32, 64), cross-attention 32, 32 px images -> 16x16x4 latents) saved in
    ``folder``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
    pipe = StableDiffusionPipeline(vae=_vae(seed), text_encoder=_text_encoder(len(tok), 32, seed=seed), tokenizer=tok,
                                   unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusionXLPipeline`` with two tiny text encoders (hidden 16 + 16 = cross-attention 32, pooled 32)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=1,
        use_linear_projection=True)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed), text_encoder=_text_encoder(len(tok), 16, seed=seed), tokenizer=tok,
        text_encoder_2=_text_encoder(len(tok), 16, projection=32, seed=seed + 1), tokenizer_2=tok, unet=unet,
        scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    return folder
