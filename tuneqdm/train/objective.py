"""A training step's two independent choices, both read from the pipeline, so that the loop stays one loop:

- the **family** (``tuneqdm.families``): how a prompt becomes the denoiser's keyword arguments, the latent layout the
  denoiser reads, the timestep it takes and what of its output is the prediction; ``Denoising`` resolves it once per
  pipeline and holds what every call shares;
- the **schedule**: DDPM-family schedulers train on epsilon or v-prediction at integer timesteps; a flow-matching one
  (read from its configuration: ``tuneqdm.families.is_flow_matching``) trains on rectified flow as diffusers'
  ``train_dreambooth_lora_flux.py`` / ``_sd3.py`` do: sigma drawn by ``--weighting_scheme`` (logit-normal by
  default), noisy = (1 - sigma)·x0 + sigma·noise, target = noise - x0, the timestep σ·T (the family converts it into
  the denoiser's own convention).

Every random draw takes the step's generator, so a run stays a function of (seed, step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..families import family, is_flow_matching


@torch.no_grad()
def encode_prompt(pipe, prompt: str, resolution: int, device, max_sequence_length: int | None = None) -> dict:
    """One prompt's conditioning without a batch dimension, exactly as the pipeline computes it at sampling time."""
    return family(pipe).encode_prompt(pipe, prompt, resolution, device, max_sequence_length)


class Denoising:
    """How one pipeline's denoiser is called in training: its family, resolved once, and the context its calls
    share at this resolution (position ids, guidance, output layout), readable as attributes."""

    def __init__(self, pipe, resolution: int):
        self.family = family(pipe)
        self.context = self.family.training_context(pipe, resolution)

    def __getattr__(self, name: str):
        context = self.__dict__.get("context", {})
        if name in context:
            return context[name]
        raise AttributeError(name)

    def to_model_layout(self, latents: torch.Tensor):
        """Latents (B, C, h, w) as the denoiser reads them (e.g. packed patch tokens)."""
        return self.family.to_model_layout(latents, self.context)

    def kwargs(self, rows: list[dict], device) -> dict:
        """The denoiser's keyword arguments for a batch of prompt conditionings (one dict per sample)."""
        return self.family.batch_kwargs(rows, device, self.context)

    def predict(self, model, x, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's prediction at ``timesteps`` (in units of the training timesteps 0..T)."""
        return self.family.predict(model, x, timesteps, cond, self.context)


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
    """A flow-matching scheduler: rectified flow on the scheduler's training sigmas (its shift included)."""

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
    if is_flow_matching(pipe.scheduler.config):
        return FlowObjective(pipe.scheduler.config, cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std,
                             cfg.mode_scale)
    return NoiseObjective(pipe.scheduler.config)
