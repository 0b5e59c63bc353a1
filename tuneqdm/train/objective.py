"""What differs between model families in a training step, so that the loop stays one loop.

Two independent choices, both read from the pipeline:

- the **family** (``tuneqdm.denoisers``): how a prompt becomes the denoiser's keyword arguments (CLIP, CLIP x 2, CLIP +
  T5, CLIP x 2 + T5, T5), the latent layout the denoiser reads (Flux packs 2x2 patches into tokens and takes position
  ids and a guidance embedding), and its output (PixArt's learned variance: the first half of the channels is the
  prediction, as in diffusers' PixArt training);
- the **schedule**: DDPM-family schedulers train on epsilon or v-prediction at integer timesteps; a
  ``FlowMatchEulerDiscreteScheduler`` trains on rectified flow as diffusers' ``train_dreambooth_lora_flux.py`` /
  ``_sd3.py`` do: sigma drawn by ``--weighting_scheme`` (logit-normal by default), noisy = (1 - sigma)·x0 +
  sigma·noise, target = noise - x0, the timestep σ·T (divided by the denoiser's timestep scale: Flux takes σ).

Every random draw takes the step's generator, so a run stays a function of (seed, step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..denoisers import denoiser, family, is_flow_matching, t5_limit, timestep_scale

NO_PIXART_RESOLUTION = {"resolution": None, "aspect_ratio": None}  # what PixArt-Σ's pipeline passes


def _time_ids(resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped square photo: (original size, crop top-left, target size)."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)


@torch.no_grad()
def encode_prompt(pipe, prompt: str, resolution: int, device, max_sequence_length: int | None = None) -> dict:
    """One prompt's conditioning without a batch dimension, exactly as the pipeline computes it at sampling time."""
    name, L = family(pipe).name, t5_limit(pipe, max_sequence_length)
    if name == "sdxl":
        emb, _, pooled, _ = pipe.encode_prompt(prompt, prompt_2=prompt, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb[0], "text_embeds": pooled[0], "time_ids": _time_ids(resolution)}
    if name == "flux":
        emb, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=prompt, device=device, max_sequence_length=L)
        return {"encoder_hidden_states": emb[0], "pooled_projections": pooled[0], "txt_ids": text_ids}
    if name == "sd3":
        emb, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=device,
                                               do_classifier_free_guidance=False, max_sequence_length=L)
        return {"encoder_hidden_states": emb[0], "pooled_projections": pooled[0]}
    if name == "pixart":
        emb, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                             clean_caption=False, max_sequence_length=L)
        return {"encoder_hidden_states": emb[0], "encoder_attention_mask": mask[0]}
    emb, _ = pipe.encode_prompt(prompt, device, 1, False)
    return {"encoder_hidden_states": emb[0]}


class Denoising:
    """How one family's denoiser is called in training: its conditioning kwargs, latent layout and output."""

    def __init__(self, pipe, resolution: int):
        self.name = family(pipe).name
        model = denoiser(pipe)
        self.timestep_scale = timestep_scale(model)
        self.learned_variance = (self.name == "pixart"
                                 and model.config.out_channels == 2 * model.config.in_channels)
        self.guidance = None
        self.img_ids = None
        if self.name == "flux":
            self._flux_setup(pipe, model, resolution)

    def _flux_setup(self, pipe, model, resolution: int):
        """Image position ids from the pipeline's public ``prepare_latents`` (it returns a given latent as is, with
        the ids); the guidance embedding at the family's default guidance (3.5 for FLUX.1-dev), as sampling uses."""
        channels = model.config.in_channels // 4
        side = 2 * (resolution // (pipe.vae_scale_factor * 2))
        placeholder = torch.zeros(1, channels, side, side)
        _, self.img_ids = pipe.prepare_latents(1, channels, resolution, resolution, torch.float32, "cpu", None,
                                               latents=placeholder)
        if model.config.guidance_embeds:
            self.guidance = family(pipe).guidance

    def to_model_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) as the denoiser reads them: Flux's 2x2-patch tokens (B, h/2·w/2, 4C).

        ``FluxPipeline._pack_latents`` is a static helper with a leading underscore; diffusers' own Flux training
        scripts call it, it has no public twin (``prepare_latents`` packs only the noise it draws itself), and
        copying its reshape would fork it. ``tests/test_train_dit.py`` pins it to ``prepare_latents``'s output."""
        if self.name != "flux":
            return latents
        from diffusers import FluxPipeline

        B, C, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, B, C, h, w)

    def kwargs(self, rows: list[dict], device) -> dict:
        """The denoiser's keyword arguments for a batch of prompt conditionings (one dict per sample)."""
        stack = {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0] if k != "txt_ids"}
        if self.name == "sdxl":
            return {"encoder_hidden_states": stack["encoder_hidden_states"],
                    "added_cond_kwargs": {"text_embeds": stack["text_embeds"], "time_ids": stack["time_ids"]}}
        if self.name == "pixart":
            return {**stack, "added_cond_kwargs": dict(NO_PIXART_RESOLUTION)}
        if self.name == "flux":
            out = {**stack, "txt_ids": rows[0]["txt_ids"].to(device), "img_ids": self.img_ids.to(device)}
            if self.guidance is not None:
                out["guidance"] = torch.full((len(rows),), self.guidance, device=device)
            return out
        return stack

    def predict(self, model, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's prediction at ``timesteps`` (in units of the training timesteps 0..T)."""
        t = timesteps / self.timestep_scale if self.timestep_scale != 1 else timesteps
        out = model(x, timestep=t, **cond, return_dict=False)[0]
        if self.learned_variance:
            out = out.chunk(2, dim=1)[0]
        return out


class NoiseObjective:
    """DDPM-family schedulers: integer timesteps, epsilon or v-prediction target (diffusers' DreamBooth script)."""

    def __init__(self, scheduler_config):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.T = self.scheduler.config.num_train_timesteps

    def timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.T, (n,), generator=gen)

    def noisy_and_target(self, latents, noise, timesteps):
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            return noisy, self.scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    def loss(self, pred, target, timesteps) -> torch.Tensor:
        return F.mse_loss(pred.float(), target.float())


class FlowObjective:
    """``FlowMatchEulerDiscreteScheduler``: rectified flow on the scheduler's training sigmas (its shift included)."""

    def __init__(self, scheduler_config, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.T = self.scheduler.config.num_train_timesteps
        self.scheme, self.logit_mean, self.logit_std, self.mode_scale = (weighting_scheme, logit_mean, logit_std,
                                                                         mode_scale)

    def timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """σ·T per sample, σ drawn as diffusers' scripts draw it (an index into the scheduler's training sigmas)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.scheme, n, self.logit_mean, self.logit_std, self.mode_scale,
                                                  generator=gen)
        index = (u * self.T).long().clamp(0, self.T - 1)
        return self.scheduler.timesteps[index].float()

    def _sigmas(self, timesteps, ndim: int) -> torch.Tensor:
        return (timesteps.float() / self.T).reshape(-1, *[1] * (ndim - 1))

    def noisy_and_target(self, latents, noise, timesteps):
        sigma = self._sigmas(timesteps, latents.ndim).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def loss(self, pred, target, timesteps) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weight = compute_loss_weighting_for_sd3(self.scheme, self._sigmas(timesteps, pred.ndim).to(pred.device))
        return (weight * (pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(1).mean()


def objective(pipe, cfg):
    """The noise objective of ``pipe``'s scheduler."""
    if is_flow_matching(type(pipe.scheduler).__name__):
        return FlowObjective(pipe.scheduler.config, cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std,
                             cfg.mode_scale)
    return NoiseObjective(pipe.scheduler.config)
