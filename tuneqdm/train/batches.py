"""The batch of each micro-step, drawn so that a run is a pure function of (settings, step).

Every random draw of micro-step ``m`` (which photos, which class images, timesteps, posterior and noise samples)
comes from a generator seeded by ``(seed, m)`` and is drawn for the GLOBAL batch on every process, each process then
taking its own rows. So a resumed run repeats the uninterrupted one bit for bit, and N processes with per-process
batch B see exactly the samples of one process with batch N x B.
"""

from __future__ import annotations

import torch

from .cache import TrainingTensors
from .config import TrainConfig
from .examples import Examples

_MIX = 0x9E3779B97F4A7C15


def step_seed(seed: int, micro_step: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + micro_step * 7919 + stream * _MIX) % (2**63 - 1)


def permutation_index(seed: int, stream: int, n: int, position: int) -> int:
    """Item at ``position`` of an endless stream of seeded permutations of ``range(n)`` (one per epoch)."""
    epoch, within = divmod(position, n)
    g = torch.Generator().manual_seed(step_seed(seed, epoch, stream + 1))
    return int(torch.randperm(n, generator=g)[within])


class Batches:
    """This process's share of every micro-step's global batch, from the examples' cached tensors."""

    def __init__(self, cfg: TrainConfig, examples: Examples, tensors: TrainingTensors, objective,
                 num_processes: int, process_index: int, device):
        self.cfg, self.examples, self.tensors, self.objective = cfg, examples, tensors, objective
        self.num_processes, self.process_index, self.device = num_processes, process_index, device
        self._latent_shape: tuple[int, ...] | None = None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The latent of one sample, read on first use."""
        if self._latent_shape is None:
            if self.tensors.dists is not None:
                self._latent_shape = tuple(self.tensors.dists["instance"][0].shape[1:])
            else:
                self._latent_shape = tuple(self.tensors.latent_dist("instance", [0])[0].shape[1:])
        return self._latent_shape

    def draw(self, micro_step: int) -> dict:
        """Inputs of the denoiser and the target of ``micro_step``: instance rows, then (with prior) class rows."""
        cfg, ex, tt = self.cfg, self.examples, self.tensors
        B = cfg.train_batch_size
        G = B * self.num_processes
        rows = slice(self.process_index * B, (self.process_index + 1) * B)
        seed = cfg.seed
        n_inst = len(ex.instance_prompt_ids)
        inst = [permutation_index(seed, 0, n_inst, micro_step * G + j) for j in range(G)]
        prior = cfg.with_prior_preservation
        cls = []
        if prior:
            for j, i in enumerate(inst):
                g = ex.instance_groups[i]
                members = ex.class_members[g]
                cls.append(members[permutation_index(seed, 10 + g, len(members), micro_step * G + j)])
        n = G * (2 if prior else 1)
        gen = torch.Generator().manual_seed(step_seed(seed, micro_step))
        timesteps = self.objective.timesteps(n, gen)
        shape = (n, *self.latent_shape)
        posterior = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)

        def mine(x):  # this process's rows: instance rows, then (with prior) class rows
            if not prior:
                return x[rows]
            return torch.cat([x[:G][rows], x[G:][rows]])

        inst_r = inst[rows]
        mean, std = tt.latent_dist("instance", inst_r)
        pids = [ex.instance_prompt_ids[i] for i in inst_r]
        if prior:
            cls_r = cls[rows]
            cm, cs = tt.latent_dist("class", cls_r)
            mean, std = torch.cat([mean, cm]), torch.cat([std, cs])
            pids += [ex.class_prompt_ids[ex.instance_groups[i]] for i in inst_r]
        device = self.device
        latents = tt.latents(mean, std, mine(posterior).to(device))
        noise, timesteps = mine(noise).to(device), mine(timesteps).to(device)
        noisy, target = self.objective.noisy_and_target(latents, noise, timesteps)
        layout = tt.denoising.to_model_layout
        return {"noisy": layout(noisy), "timesteps": timesteps, "target": layout(target),
                "cond": tt.conditioning(pids), "n_instance": len(inst_r)}
