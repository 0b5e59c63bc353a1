"""Tiny diffusers denoisers built in code (never downloaded), diffusers-test style."""

import torch


def tiny_unet(seed=0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg)


def tiny_sdxl_unet():
    return tiny_unet(
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        transformer_layers_per_block=(1, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


def sdxl_kwargs(batch):
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)}}


def tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
    )


def tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    )


def perturb_scales(model, seed=1, amount=0.2):
    """Give every expert different scales so that routing mistakes show in the outputs."""
    import tuneqdm

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuneqdm.scale_parameters(model):
            p.mul_(1 + amount * torch.randn(p.shape, generator=g))
