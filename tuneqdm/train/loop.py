"""The DreamBooth training loop on accelerate: setup, steps, logging, validation, checkpoints, resume.

Reproducibility: every random draw of micro-step ``m`` (which photos, which class images, timesteps, posterior and
noise samples) comes from a generator seeded by ``(seed, m)`` and is drawn for the GLOBAL batch on every process,
each process then taking its own rows. So the run is a pure function of (settings, step), a resumed run repeats the
uninterrupted one bit for bit, and N processes with per-process batch B see exactly the samples of one process with
batch N x B.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..families import check_size, denoiser, is_flow_matching, native_size
from ..errors import TrainWarning, TuneQDMError
from ..files import (WRITE_ERRORS, atomic_dir, first_line, output_lock, read_json, remove_stale_temporaries,
                     write_error_reason)
from ..loading import (QuantizedCache, Source, assemble, denoiser_skeleton, float_denoiser, float_fingerprint,
                       quantized_denoiser, resolve)
from ..memory import PhaseMemory, pin_mmap_threshold
from ..progress import pipeline_progress, progress, quiet_while, stage
from ..quant.kernels import DYNAMIC_BITS, FLOAT_BITS
from ..quant.paths import DynamicActivations
from ..results import PRODUCTS, read_training_json
from ..sampling import generate
from ..serialization import fingerprint
from ..tuning.config import interval_problem
from . import checkpoint as ckpt
from .cache import TrainingTensors, release
from .config import LORA_METHODS, TrainConfig
from .data import IMAGE_SUFFIXES, Subject, load_folder, rare_token_problem, read_subjects_file, subject_metadata, warn
from .methods import (check_lora_rank, kind, load_quantized_base, load_trainable_state, prepare,
                      trainable_state)
from .objective import objective
from .outputs import save_result
from .prior import ensure_class_images

LOG = "train_log.jsonl"
TRACKER_LOGS = "logs"  # --report_to tensorboard: accelerate's tracker files
CLASS_PLACEHOLDER = "<class>"  # replaced by the class of a toy subject folder's subject.json
_MIX = 0x9E3779B97F4A7C15


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during training, after the state was saved (the message says where); the exit
    status is 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signum``): the loop saves a checkpoint and stops."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


def step_seed(seed: int, micro_step: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + micro_step * 7919 + stream * _MIX) % (2**63 - 1)


def permutation_index(seed: int, stream: int, n: int, position: int) -> int:
    """Item at ``position`` of an endless stream of seeded permutations of ``range(n)`` (one per epoch)."""
    epoch, within = divmod(position, n)
    g = torch.Generator().manual_seed(step_seed(seed, epoch, stream + 1))
    return int(torch.randperm(n, generator=g)[within])


@dataclass
class Examples:
    """Instance photos (with the prompt and class group of each) and class images (by group)."""

    instance_pixels: torch.Tensor
    instance_prompt_ids: list[int]
    instance_groups: list[int]
    class_pixels: torch.Tensor | None
    class_members: list[list[int]]  # per class group, indices into class_pixels
    class_prompt_ids: list[int]  # per class group
    prompts: list[str]


class Trainer:
    """One training run: ``setup`` checks the inputs, then builds the pipeline, the examples and the optimizer and
    resumes; ``run`` is the loop. Every attribute is declared here; ``setup`` fills them in, step by step."""

    def __init__(self, cfg: TrainConfig, callbacks=()):
        self.cfg = cfg
        self.callbacks = list(callbacks)  # called as cb(trainer, step) after each optimizer step (tests, tools)
        self.out = Path(cfg.output_dir)
        self.step = 0  # optimizer steps done
        self.finished = False  # --resume_from_checkpoint latest on a run that is done: nothing trains
        # resolved before any model loads
        self.resume_path: Path | None = None  # the checkpoint to resume from
        self.resumed_from: Path | None = None  # the same, once its state is loaded
        self.subjects: list[Subject] = []
        self.validation_prompt: str | None = cfg.validation_prompt  # its <class> placeholder replaced
        self.acc = None  # accelerate's Accelerator
        self.main = True  # this process writes the files and the messages
        self.base_id: str | None = None
        self.identity: dict = {}  # the resolved settings a resume must share (see _settings_identity)
        self._source: Source | None = None  # the base's checked files (tuneqdm.loading): see ``source``
        self.memory: PhaseMemory | None = None  # the peak of every phase and of the whole process
        # the base model and the data
        self.pipeline_class: type | None = None
        self.pipe = None  # the base pipeline, kept for validation when the memory savers are off
        self.resolution: int | None = None
        self.examples: Examples | None = None
        self.tensors: TrainingTensors | None = None  # latents and prompt embeddings (cached with the memory savers)
        self.objective = None  # noise, target and loss of the base's scheduler (objective.py)
        self.T: int | None = None  # the scheduler's training timesteps
        self.latent_shape: tuple[int, ...] | None = None  # of one sample, read on first use
        # what trains
        self.unet = None  # the denoiser as accelerate prepared it (wrapped for data parallel)
        self.model = None  # the same denoiser, unwrapped
        self.params: list[torch.nn.Parameter] = []
        self.optimizer = None
        self.lr_scheduler = None
        self.fingerprint: str | None = None  # of the frozen base the result belongs to

    # ---- setup ---------------------------------------------------------------------------------------------
    def _check_output_dir(self):
        cfg = self.cfg
        if self.out.exists() and not self.out.is_dir():
            raise TuneQDMError(f"--output_dir {self.out} exists and is not a folder")
        used = self.out.is_dir() and any((self.out / p).exists() for p in (*PRODUCTS, "checkpoints", LOG,
                                                                             TRACKER_LOGS))
        if used and not cfg.resume_from_checkpoint and not cfg.force:
            raise TuneQDMError(f"--output_dir {self.out} already holds a training run: pass "
                               "--resume_from_checkpoint latest to continue it, --force to start over, "
                               "or choose another --output_dir")

    def _remove_stale_temporaries(self):
        """Temporary folders of writers that died (a kill -9 while a checkpoint or the result was written)."""
        remove_stale_temporaries(self.out.parent, self.out.name)
        for folder in (self.out, self.out / "checkpoints", self.out / "validation"):
            remove_stale_temporaries(folder)

    def _subjects(self) -> list[Subject]:
        cfg = self.cfg
        if cfg.subjects:
            entries = read_subjects_file(cfg.subjects)
        else:
            entries = [{"instance_data_dir": Path(cfg.instance_data_dir), "instance_prompt": cfg.instance_prompt}]
        subjects = []
        for e in entries:
            meta = subject_metadata(e["instance_data_dir"])
            prompt = e.get("instance_prompt") or meta.get("instance_prompt")
            if not prompt:
                raise TuneQDMError(f"--instance_prompt is required for {e['instance_data_dir']} "
                                   "(e.g. \"a sks dog\")")
            class_prompt = e.get("class_prompt") or cfg.class_prompt or meta.get("class_prompt")
            noun = meta.get("class") if isinstance(meta.get("class"), str) else None
            if CLASS_PLACEHOLDER in prompt or CLASS_PLACEHOLDER in (class_prompt or ""):
                if noun is None:
                    raise TuneQDMError(f"the prompt has a {CLASS_PLACEHOLDER} placeholder but "
                                       f"{e['instance_data_dir']} has no subject.json naming the class: "
                                       "write the class word instead")
                prompt = prompt.replace(CLASS_PLACEHOLDER, noun)
                class_prompt = class_prompt.replace(CLASS_PLACEHOLDER, noun) if class_prompt else None
            subject = Subject(Path(e["instance_data_dir"]), prompt, class_prompt)
            subject.noun = noun
            subjects.append(subject)
        return subjects

    def _check_inputs(self, subjects: list[Subject]):
        """Everything that needs no model: prompts, placeholders, prior preservation, the tracker's package."""
        cfg = self.cfg
        self.validation_prompt = cfg.validation_prompt
        if self.validation_prompt and CLASS_PLACEHOLDER in self.validation_prompt:
            nouns = {s.noun for s in subjects}
            if len(nouns) != 1 or None in nouns:
                raise TuneQDMError(f"--validation_prompt has a {CLASS_PLACEHOLDER} placeholder but the subjects do "
                                   "not name one class: write the class word instead")
            self.validation_prompt = self.validation_prompt.replace(CLASS_PLACEHOLDER, nouns.pop())
        for s in subjects:
            problem = rare_token_problem(s.instance_prompt, s.class_prompt)
            if problem:
                warn(problem)
            if cfg.with_prior_preservation and not s.class_prompt:
                raise TuneQDMError("--with_prior_preservation needs --class_prompt (e.g. \"a dog\")")
        if cfg.report_to == "tensorboard":
            from importlib.util import find_spec

            if find_spec("tensorboard") is None and find_spec("tensorboardX") is None:
                raise TuneQDMError("--report_to tensorboard needs TensorBoard, which is not installed: "
                                   "pip install tensorboard")

    @property
    def source(self) -> Source:
        """The base, resolved to its checked files on first use (no model is built)."""
        if self._source is None:
            cfg = self.cfg
            self._source = resolve(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant,
                                   cfg.single_file_config)
        return self._source

    def _check_base(self):
        """The base's files checked (one line for an unsupported, missing or damaged one) and --s1_intervals against
        its timesteps, read from its scheduler config: no model is built."""
        T = self.source.config("scheduler").get("num_train_timesteps")
        if isinstance(T, int):
            self.cfg.experts_beyond(T)
        for a, b in self.cfg.intervals if isinstance(T, int) else ():
            if interval_problem(a, b, T) == "beyond":
                raise TuneQDMError(f"--s1_intervals {self.cfg.s1_intervals!r}: this base has {T} timesteps, so an "
                                   f"interval must end at {T} or below")

    def _model_settings(self) -> dict:
        """The settings that shape only some models' runs, resolved for this base: the flow-matching ones when its
        scheduler is one, the T5 prompt length when it has a T5 encoder (so other runs record neither)."""
        c, out = self.cfg, {}
        if is_flow_matching(self.source.config("scheduler")):
            out.update(weighting_scheme=c.weighting_scheme, logit_mean=c.logit_mean, logit_std=c.logit_std,
                       mode_scale=c.mode_scale if c.weighting_scheme == "mode" else None)
        if self.source.family.t5_tokenizer is not None:
            out["max_sequence_length"] = c.max_sequence_length  # None: the pipeline's own default
        return out

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        cfg = self.cfg
        _check_process_precision(cfg.mixed_precision)
        tracking = cfg.report_to == "tensorboard"
        try:
            return Accelerator(
                cpu=not torch.cuda.is_available(),  # several CPU processes: gloo (accelerate's MULTI_CPU)
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
                log_with="tensorboard" if tracking else None,
                project_config=ProjectConfiguration(project_dir=str(self.out),
                                                    logging_dir=str(self.out / TRACKER_LOGS)) if tracking else None,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)])
        except (ValueError, RuntimeError) as e:
            raise TuneQDMError(f"cannot set up training ({first_line(e, None)})") from None

    def setup(self):
        """Check what needs no model; then, one phase at a time so that each phase's memory is freed before the next
        one's is taken: encode the photos and prompts (text encoders streamed from their files, the VAE, the
        denoiser only as a skeleton; class images by the float denoiser streamed module by module), release those,
        build the denoiser (packed integers streamed from its files or the cache), the optimizer, and resume."""
        cfg = self.cfg
        pin_mmap_threshold()
        self._check_before_accelerate()
        self._start_accelerator()
        self.memory = PhaseMemory(self.acc.device)
        self.base_id = self.source.base_id
        self.identity = self._settings_identity(self.subjects)
        self.finished = self._check_before_loading()
        if self.finished:
            return self
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        with self.memory.phase("encode"):
            pipe = self._build_pipeline()
            self._build_examples(pipe)
            self._encode_examples(pipe)
        if cfg.savers:  # memory savers: the VAE and the text encoders go, the examples live on as latents/embeddings
            release(pipe)
            self.examples.instance_pixels = self.examples.class_pixels = None
            del pipe
            gc.collect()
        with self.memory.phase("denoiser"):
            unet = self._denoiser()
        if not cfg.savers:
            setattr(pipe, self.source.denoiser, unet)
            self.pipe = pipe
        with self.memory.phase("prepare"):
            self._build_optimizer(unet)
            self._resume()
        return self

    def _check_before_accelerate(self):
        """Stale temporaries removed, the output folder and the checkpoint to resume checked, the subjects read."""
        cfg = self.cfg
        self._remove_stale_temporaries()
        self._check_output_dir()
        self.resume_path = ckpt.resolve(self.out, cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
        self.subjects = self._subjects()
        self._check_inputs(self.subjects)
        self._check_base()

    def _start_accelerator(self):
        self.acc = self._accelerator()
        self.main = self.acc.is_main_process
        if not self.main or self.cfg.quiet:
            _quiet_libraries()

    def _build_pipeline(self):
        """The base pipeline on this process's device for encoding (its denoiser a skeleton on the meta device),
        checked against the method; the resolution it trains at."""
        cfg = self.cfg
        pipe = assemble(self.source, denoiser_skeleton(self.source), self.acc.device, text_encoders=cfg.encoders)
        self.pipeline_class = type(pipe)
        if cfg.method in LORA_METHODS and not hasattr(self.pipeline_class, "save_lora_weights"):
            raise TuneQDMError(f"--method {cfg.method}: diffusers has no LoRA loader for {self.pipeline_class.__name__}"
                               ", so its LoRA could not be used: train a scale method (e.g. --method tuneqdm) or fp")
        if cfg.method in LORA_METHODS:  # on the skeleton: the shapes, before any weight loads
            check_lora_rank(denoiser(pipe), cfg.rank, cfg.targets)
        self.resolution = self._resolution(pipe)
        return pipe

    def _encode_examples(self, pipe):
        """Every image's latent distribution and every prompt's embedding (computed once with the memory savers), and
        the training objective of the base's scheduler."""
        cfg, ex = self.cfg, self.examples
        images = len(ex.instance_pixels) + (0 if ex.class_pixels is None else len(ex.class_pixels))
        with stage(f"encoding {images} images and {len(ex.prompts)} prompts"):
            self.tensors = TrainingTensors(pipe, ex.instance_pixels, ex.class_pixels, ex.prompts, self.resolution,
                                           self.acc.device, memory_savers=cfg.savers,
                                           max_sequence_length=cfg.max_sequence_length)
        self.objective = objective(pipe, cfg)
        self.T = self.objective.T

    def _build_optimizer(self, unet):
        """What trains (quantized scales, LoRA or the whole denoiser), AdamW on it (each group at its own learning
        rate, from ``prepare``) and the lr schedule, all prepared by accelerate."""
        cfg, acc = self.cfg, self.acc
        float_print = float_fingerprint(unet) if cfg.method == "lora" else None  # before PEFT renames the layers
        with stage(f"preparing {cfg.method} on the {kind(unet)}"):
            unet, groups = prepare(unet, cfg, self.T, self.base_id)
        if cfg.activation_bits == DYNAMIC_BITS:  # int8 activations, as `generate` samples the result by default
            DynamicActivations(exclude=self.source.family.first_last).install(unet)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles,
                                          power=cfg.lr_power)
        # DDP: broadcast_buffers=False keeps the frozen integers from being re-sent every step (torch 2.13 warns that
        # the flag is renamed; its replacement does not exist in older versions, so the warning is silenced)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
            self.unet, self.optimizer = acc.prepare(unet, optimizer)
        self.model = acc.unwrap_model(self.unet)
        if cfg.quantized:
                self.fingerprint = fingerprint(self.model)
        else:
            self.fingerprint = float_print

    def _denoiser(self):
        """The denoiser to train: a saved quantized base; for the scale methods and qlora the base's packed integers
        (streamed from its files on this process's device, or read from the cache of quantized bases); the float
        denoiser for fp and lora, which train or wrap it."""
        cfg, device = self.cfg, self.acc.device
        if cfg.quantized_base:
            return load_quantized_base(cfg.quantized_base, self.source.config(self.source.denoiser), device)
        if cfg.method in ("fp", "lora"):  # float32, as their results' fingerprints and every earlier run had it
            return float_denoiser(self.source, device)
        return quantized_denoiser(self.source, cfg.quant_config(self.T), device, QuantizedCache.of(cfg.quantized_cache),
                                  store=self.main)

    def _resolution(self, pipe) -> int:
        """--resolution, or the model's native size; refused when the denoiser cannot take it."""
        native, need = native_size(pipe)
        check_size(pipe, self.cfg.resolution, "--resolution", need)
        return self.cfg.resolution or native

    def _build_examples(self, pipe):
        """The subjects' photos and (prior preservation) the class images, generated by the base where missing."""
        cfg, subjects = self.cfg, self.subjects
        prompts: list[str] = []

        def prompt_id(p):
            if p not in prompts:
                prompts.append(p)
            return prompts.index(p)

        pixels, pids, groups = [], [], []
        class_prompts = []
        for s in subjects:
            s.photos = load_folder(s.instance_data_dir, self.resolution, cfg.center_crop, cfg.seed)
            group = -1
            if cfg.with_prior_preservation:
                if s.class_prompt not in class_prompts:
                    class_prompts.append(s.class_prompt)
                group = class_prompts.index(s.class_prompt)
            for photo in s.photos:
                pixels.append(photo.pixels)
                pids.append(prompt_id(s.instance_prompt))
                groups.append(group)
        class_pixels, members, class_pids = None, [], []
        if cfg.with_prior_preservation:
            root = Path(cfg.class_data_dir) if cfg.class_data_dir else self.out / "class_images"
            cls_px = []
            for cp in class_prompts:
                photos = self._class_photos(pipe, cp, root if len(class_prompts) == 1 else root / _slug(cp))
                members.append(list(range(len(cls_px), len(cls_px) + len(photos))))
                cls_px += [p.pixels for p in photos]
                class_pids.append(prompt_id(cp))
            class_pixels = torch.stack(cls_px)
        self.examples = Examples(torch.stack(pixels), pids, groups, class_pixels, members, class_pids, prompts)

    def _class_photos(self, pipe, prompt: str, folder: Path) -> list:
        """The class images of ``prompt`` in ``folder`` (--num_class_images of them), the missing ones generated by
        the base on the main process first."""
        cfg, made = self.cfg, 0
        if self.main:
            with self._float_denoiser_in(pipe):
                made = ensure_class_images(pipe, folder, prompt, cfg.num_class_images, self.resolution, cfg.seed,
                                           cfg.prior_inference_steps, cfg.sample_batch_size)
        self.acc.wait_for_everyone()
        if made and self.main and not cfg.quiet:
            print(f"generated {made} class images of '{prompt}' in {folder}", file=sys.stderr)
        photos = load_folder(folder, self.resolution, True, cfg.seed, what="--class_data_dir")
        return photos[:max(cfg.num_class_images, 1)]

    @contextlib.contextmanager
    def _float_denoiser_in(self, pipe):
        """The base's float denoiser in ``pipe`` for the block, streamed from its files module by module (class images
        are the float model's own, as they always were, without the float model in memory)."""
        skeleton = denoiser(pipe)
        setattr(pipe, self.source.denoiser, float_denoiser(self.source, self.acc.device, stream=True))
        try:
            with self.memory.phase("class_images"):
                yield
        finally:
            setattr(pipe, self.source.denoiser, skeleton)

    def _settings_identity(self, subjects: list[Subject]) -> dict:
        """The resolved settings that shape the result, the subjects included (their photos by content): what a
        resumed run must share with its checkpoint. The base's fingerprint and the resolution come after loading."""
        c = self.cfg
        return {**c.resolved_settings(), **self._model_settings(), "train_batch_size": None,
                "global_batch_size": c.train_batch_size * self.acc.num_processes,  # the draws depend on this only
                "base_id": self.base_id, "instance_prompts": [s.instance_prompt for s in subjects],
                "class_prompts": [s.class_prompt for s in subjects] if c.with_prior_preservation else None,
                "instance_photos": _photos_digest(subjects)}

    def _model_identity(self) -> dict:
        return {"base_fingerprint": self.fingerprint, "resolution": self.resolution}

    def _identity(self) -> dict:
        """What must agree between a checkpoint and the run resuming it (recorded in checkpoints and training.json)."""
        return {**self.identity, **self._model_identity()}

    def _check_before_loading(self) -> bool:
        """Before the model loads: is the run already finished (``--resume_from_checkpoint latest``)? Does the
        checkpoint to resume come from the same settings? A changed setting is refused with one line naming it."""
        cfg = self.cfg
        if cfg.resume_from_checkpoint == "latest":
            done = read_training_json(self.out, "start over with --force, or choose another --output_dir")
            same = isinstance(done.get("identity"), dict) and all(
                _recorded(done["identity"], k, object()) == v for k, v in self.identity.items())
            steps = done.get("steps")
            if same and isinstance(steps, int) and steps >= cfg.max_train_steps:
                if self.main and not cfg.quiet:
                    print(f"{self.out} already holds this finished run ({done['steps']} steps): nothing to train",
                          file=sys.stderr)
                return True
            if done and not same and self.resume_path is None:
                _refuse_changes(done.get("identity"), self.identity, f"--output_dir {self.out} holds a finished run")
            if self.resume_path is None and self.main:
                warn(f"no checkpoint in {self.out / 'checkpoints'}: starting from step 0")
        if self.resume_path is not None:
            meta = read_json(self.resume_path / ckpt.STATE_JSON, "checkpoint")
            _refuse_changes(meta.get("identity") if isinstance(meta, dict) else None, self.identity,
                            f"checkpoint {self.resume_path}")
            step = meta.get("step") if isinstance(meta, dict) else None
            if isinstance(step, int) and not isinstance(step, bool) and step > cfg.max_train_steps:
                # before, the result was the checkpoint's, reported as "trained for --max_train_steps steps"
                raise TuneQDMError(f"checkpoint {self.resume_path} has already trained {step} steps, more than "
                                   f"--max_train_steps {cfg.max_train_steps}: pass --max_train_steps {step} or more "
                                   "to continue it, or --force to start over")
        return False

    def _resume(self):
        """The checkpoint's trainable tensors, optimizer, lr schedule, RNG states and step (when there is one)."""
        path = self.resume_path
        if path is None:
            return
        tensors, meta = ckpt.load(path)
        _refuse_changes(meta.get("identity"), self._model_identity(), f"checkpoint {path}")
        load_trainable_state(self.model, ckpt.model_tensors(tensors), path)
        ckpt.restore(tensors, meta, self.optimizer, self.lr_scheduler)
        self.step = int(meta["step"])
        self.resumed_from = path

    # ---- one step --------------------------------------------------------------------------------------------
    def batch(self, micro_step: int) -> dict:
        """This process's share of the global batch of ``micro_step``: inputs of the denoiser and the target."""
        cfg, ex, acc, tt = self.cfg, self.examples, self.acc, self.tensors
        B, P = cfg.train_batch_size, acc.num_processes
        G = B * P
        rows = slice(acc.process_index * B, (acc.process_index + 1) * B)
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
        shape = (n, *self._latent_shape())
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
        device = acc.device
        latents = tt.latents(mean, std, mine(posterior).to(device))
        noise, timesteps = mine(noise).to(device), mine(timesteps).to(device)
        noisy, target = self.objective.noisy_and_target(latents, noise, timesteps)
        layout = tt.denoising.to_model_layout
        return {"noisy": layout(noisy), "timesteps": timesteps, "target": layout(target),
                "cond": tt.conditioning(pids), "n_instance": len(inst_r)}

    def _latent_shape(self) -> tuple[int, ...]:
        if self.latent_shape is None:
            if self.tensors.dists is not None:
                self.latent_shape = tuple(self.tensors.dists["instance"][0].shape[1:])
            else:
                self.latent_shape = tuple(self.tensors.latent_dist("instance", [0])[0].shape[1:])
        return self.latent_shape

    def loss(self, b: dict) -> torch.Tensor:
        pred = self.tensors.denoising.predict(self.unet, b["noisy"], b["timesteps"], b["cond"])
        target, t, k = b["target"], b["timesteps"], b["n_instance"]
        loss = self.objective.loss
        if not self.cfg.with_prior_preservation:
            return loss(pred, target, t)
        return loss(pred[:k], target[:k], t[:k]) + self.cfg.prior_loss_weight * loss(pred[k:], target[k:], t[k:])

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to ``--max_train_steps``: per step, the update and its log row, the callbacks, the checkpoint and
        validation schedules; then the result. Ctrl-C or SIGTERM save a checkpoint and stop."""
        cfg = self.cfg
        if self.finished:
            return self.out
        bar = progress(total=cfg.max_train_steps, initial=self.step, desc="train", unit="step", disable=not self.main)
        log = self._open_log()
        with _Signals() as signals:  # the log's peak is the loop's; training.json has every phase's and the whole's
            with self.memory.phase("loop"), self._closing(bar, log), self._checkpoint_on_signal(signals, bar):
                while self.step < cfg.max_train_steps:
                    loss, lr = self._step(signals, log)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)
                    for cb in self.callbacks:
                        cb(self, self.step)
                    if self._checkpoint_due():
                        with signals.held():
                            self.save_checkpoint()
                    if self._validation_due():
                        self.validate()
            with signals.held(deliver=False), self.memory.phase("save"):
                self._save_result()
        self.acc.end_training()
        return self.out

    def _step(self, signals, log) -> tuple[float, float]:
        """One optimizer step (all its micro-steps) and its log row; a signal during the update waits for its end."""
        cfg, acc = self.cfg, self.acc
        t0 = time.perf_counter()
        losses = []
        with contextlib.ExitStack() as update:
            for micro in range(cfg.gradient_accumulation_steps):
                with acc.accumulate(self.unet):
                    loss = self.loss(self.batch(self.step * cfg.gradient_accumulation_steps + micro))
                    losses.append(self._mean_loss(loss))
                    if loss.requires_grad:  # s1: a batch routed wholly to the frozen base scales trains nothing
                        acc.backward(loss)
                    if acc.sync_gradients:
                        update.enter_context(signals.held())  # a Ctrl-C during the update waits for its end
                        if cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            lr = self._learning_rate()
            self.lr_scheduler.step()
            self.step += 1
            loss_value = sum(losses) / len(losses)
            self._log_step(log, loss_value, lr, time.perf_counter() - t0)
        return loss_value, lr

    def _mean_loss(self, loss: torch.Tensor) -> float:
        """The micro-step's loss averaged over the processes; a NaN stops the run (the last good checkpoint named)."""
        mean_loss = self.acc.gather(loss.detach()[None]).mean()
        if not torch.isfinite(mean_loss):
            self._diverged(f"loss became NaN at step {self.step + 1}")
        return float(mean_loss)

    def _learning_rate(self) -> float:
        """This step's ``--learning_rate`` as the schedule sets it: for the scale methods the relative rate, which each
        layer's ``s_out`` group runs at a multiple of (``scale_param_groups``). All diffusers schedules are LambdaLR."""
        schedule = self.lr_scheduler
        return self.cfg.lr * schedule.lr_lambdas[0](schedule.last_epoch)

    def _log_step(self, log, loss: float, lr: float, seconds: float) -> None:
        """The step's row of ``train_log.jsonl`` (main process) and of the tracker (``--report_to``)."""
        if self.main:
            row = {"step": self.step, "loss": round(loss, 6), "lr": lr, "s_per_step": round(seconds, 4),
                   "peak_mem_mib": round(self.memory.current() / 2**20, 1),
                   "peak_mem": "cuda" if self.memory.cuda else "rss"}
            try:
                log.write(json.dumps(row) + "\n")
                log.flush()
            except WRITE_ERRORS as e:
                raise self._write_failed(e, self.out / LOG) from None
        if self.cfg.report_to == "tensorboard":
            self.acc.log({"loss": loss, "lr": lr, "s_per_step": seconds}, step=self.step)

    def _checkpoint_due(self) -> bool:
        """Every ``--checkpointing_steps`` steps, except at the end (the result is written then)."""
        return self.step % self.cfg.checkpointing_steps == 0 and self.step < self.cfg.max_train_steps

    def _validation_due(self) -> bool:
        return bool(self.cfg.validation_prompt) and self.step % self.cfg.validation_steps == 0

    def _open_log(self):
        """The output folder made ready (an old run's files gone with --force, the log cut back to the resumed step,
        the tracker started) and the log opened for appending: on the main process; None on the others."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main and cfg.force and not self.resumed_from:
            _start_over(self.out)
        if self.main:
            _truncate_log(self.out / LOG, self.step)  # rows after the resumed step are about to be written again
        if cfg.report_to == "tensorboard":
            self.acc.init_trackers("tuneqdm", config={k: v for k, v in cfg.to_dict().items()
                                                      if isinstance(v, (bool, int, float, str))})
        return open(self.out / LOG, "a") if self.main else None  # closed by _closing

    @contextlib.contextmanager
    def _closing(self, bar, log):
        """The bar and the log closed and the trackers flushed, however the loop ends."""
        try:
            yield
        finally:
            bar.close()
            if log is not None:
                log.close()
            for tracker in self.acc.trackers:
                tracker.finish()

    @contextlib.contextmanager
    def _checkpoint_on_signal(self, signals, bar):
        """Ctrl-C or SIGTERM in the loop: a checkpoint of the last finished step (a second signal does not abort the
        save), then ``TrainingInterrupted`` naming it."""
        try:
            yield
        except KeyboardInterrupt as e:
            bar.close()
            signum = getattr(e, "signum", signal.SIGINT)
            with signals.held(deliver=False):
                where = self.save_checkpoint()
            tail = f"; checkpoint {where}: continue with --resume_from_checkpoint latest" if where else ""
            raise TrainingInterrupted(f"at step {self.step}{tail}", signum) from None

    def _save_result(self):
        """The trained result, unless the weights are not finite (then the last good checkpoint is named)."""
        cfg, acc = self.cfg, self.acc
        acc.wait_for_everyone()
        if not self._finite():  # e.g. a huge learning rate in the last steps: never store such an adapter
            self._diverged(f"the trained weights became NaN or infinite at step {self.step}")
        if not self._outputs_finite():  # finite scales can still be so large that sampling overflows
            self._diverged(f"the trained model's output became NaN or infinite at step {self.step} (its weights are "
                           "finite but far too large)", keep_current=False)
        if self.main:
            try:
                save_result(self.model, self.out, cfg.method, self.pipeline_class, self.info())
            except WRITE_ERRORS as e:
                raise self._write_failed(e, f"the result into {self.out}") from None
            if cfg.validation_prompt and self.step % cfg.validation_steps != 0:
                self.validate()
        acc.wait_for_everyone()

    def info(self) -> dict:
        cfg = self.cfg
        return {"tuneqdm_method": cfg.method, "base_id": self.base_id, "steps": self.step,
                **({"base_fingerprint": self.fingerprint} if cfg.method in LORA_METHODS else {}),
                "instance_prompts": [s.instance_prompt for s in self.subjects],
                "class_prompts": sorted({s.class_prompt for s in self.subjects if s.class_prompt}),
                "classes": [s.noun for s in self.subjects],
                "instance_data_dirs": [str(s.instance_data_dir) for s in self.subjects],
                "validation_prompt": self.validation_prompt, "resolution": self.resolution,
                "quantized_base": str(Path(cfg.quantized_base).resolve()) if cfg.quantized_base else None,
                "learning_rate": cfg.lr, "lr_is_relative": cfg.trains_scales, "settings": cfg.to_dict(),
                "activation_bits": cfg.activation_bits,  # `generate` samples the result with these by default
                "identity": self._identity(), "memory": self.memory.record()}

    def save_checkpoint(self) -> Path | None:
        """Write the state after ``self.step`` completed steps (main process); others wait."""
        acc, path = self.acc, None
        if not self._finite():  # never store a diverged state as a checkpoint
            self._diverged(f"the trained weights became NaN or infinite at step {self.step}")
        acc.wait_for_everyone()
        if self.main:
            path = self._write_checkpoint()
        acc.wait_for_everyone()
        return path

    def _write_checkpoint(self) -> Path:
        path = ckpt.checkpoint_dir(self.out, self.step)
        if not (path / ckpt.STATE_JSON).is_file():
            path = ckpt.save(self.out, self.step, trainable_state(self.model), self.optimizer, self.lr_scheduler,
                             {"identity": self._identity(), "data_order": {"seed": self.cfg.seed,
                              "micro_steps_done": self.step * self.cfg.gradient_accumulation_steps},
                              "settings": self.cfg.to_dict()}, self.cfg.checkpoints_total_limit)
        return path

    def _write_failed(self, e: BaseException, what) -> TuneQDMError:
        """The one-line error of a failed write (main process) after keeping the current state as a checkpoint
        when it is finite and the disk takes it, else naming the newest good one."""
        where = None
        if self.step > 0 and self._finite():
            with contextlib.suppress(TuneQDMError):
                where = self._write_checkpoint()
        if where is None:
            found = ckpt.list_checkpoints(self.out)
            where = found[-1][1] if found else None
        kept = (f"the last good checkpoint is {where}: make room and continue with --resume_from_checkpoint latest"
                if where else "no checkpoint could be kept")
        return TuneQDMError(f"cannot write {what} ({write_error_reason(e)}); nothing partial was left, {kept}")

    def _finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    @torch.no_grad()
    def _outputs_finite(self) -> bool:
        """One denoiser forward per quarter of the timesteps (every expert), on fixed noise and the first prompt:
        the probe of what sampling will do. Its own generator: the run's random draws are untouched."""
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, 0, stream=99))
        device = self.acc.device
        noise = self.tensors.denoising.to_model_layout(torch.randn((1, *self._latent_shape()), generator=gen))
        noise = noise.to(device)
        cond = self.tensors.conditioning([self.examples.instance_prompt_ids[0]])
        was_training = self.model.training
        self.model.eval()
        try:
            for quarter in range(4):
                t = torch.tensor([(2 * quarter + 1) * self.T // 8], device=device)
                out = self.tensors.denoising.predict(self.model, noise, t, cond)
                if not bool(torch.isfinite(out).all()):
                    return False
        finally:
            self.model.train(was_training)
        return True

    def _diverged(self, what: str, keep_current: bool = True):
        """Stop: keep (or write, when the current state is still finite and ``keep_current``) the last good
        checkpoint and say which."""
        where = None
        if keep_current and self._finite() and self.step > 0:
            where = self.save_checkpoint()
        elif self.main:
            found = ckpt.list_checkpoints(self.out)
            where = found[-1][1] if found else None
        kept = (f"the last good checkpoint is {where} (a resume repeats this run's settings): lower "
                "--learning_rate and start over with --force" if where
                else "no good checkpoint exists: lower --learning_rate and start again")
        raise TuneQDMError(f"{what}; stopped, {kept}")

    @torch.no_grad()
    def validate(self):
        """``--num_validation_images`` images of ``--validation_prompt`` into ``validation/step-<step>/``."""
        if not self.main:
            return
        cfg = self.cfg
        model = self.model
        model.eval()
        try:
            pipe = self.pipe
            if pipe is None:
                pipe = assemble(self.source, model, self.acc.device, text_encoders=cfg.encoders)
            pipeline_progress(pipe, f"validation at step {self.step}")
            images = generate(pipe, self.validation_prompt, cfg.num_validation_images, cfg.validation_inference_steps,
                              seed=cfg.seed, height=self.resolution, width=self.resolution)
            folder = self.out / "validation" / f"step-{self.step:06d}"
            try:
                with atomic_dir(folder) as tmp:
                    for i, image in enumerate(images):
                        image.save(tmp / f"{i:03d}.png")
                    (tmp / "prompt.txt").write_text(self.validation_prompt + "\n")
            except WRITE_ERRORS as e:
                raise self._write_failed(e, folder) from None
        finally:
            if self.pipe is None:
                pipe = None
                gc.collect()
            model.train()


class _Signals:
    """SIGINT and SIGTERM during the loop stop it with a checkpoint, as Ctrl-C always did. While ``held`` (an
    optimizer update, a checkpoint being written) a signal waits for the block's end: the parameters, optimizer
    moments, lr schedule and step counter are then consistent, and a second signal cannot abort the save."""

    def __init__(self):
        self.received: list[int] = []
        self.depth = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.received.append(signum)
        if self.depth == 0:
            raise _Signalled(signum)

    @contextlib.contextmanager
    def held(self, deliver: bool = True):
        """Signals wait until the block ends; then (``deliver``) the first one stops the loop."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if deliver and self.depth == 0 and self.received:
            raise _Signalled(self.received[0])


# settings added after identities were first recorded: the value a record without them was trained with
_ADDED_SETTINGS = {"activation_bits": FLOAT_BITS}


def _recorded(identity: dict, key: str, missing=None):
    """A recorded identity's value of ``key`` (an added setting's old value where the record predates it)."""
    return identity.get(key, _ADDED_SETTINGS.get(key, missing))


def _refuse_changes(theirs, mine: dict, what: str) -> None:
    """One line naming the first setting of ``mine`` that ``theirs`` (a recorded identity) does not share."""
    if not isinstance(theirs, dict):
        theirs = {}
    theirs = {**{k: v for k, v in _ADDED_SETTINGS.items() if k in mine}, **theirs}
    for key, value in mine.items():
        if key not in theirs:
            raise TuneQDMError(f"{what} was made by an older tuneqdm that did not record its {key}: start over with "
                               "--force or choose another --output_dir")
        if theirs[key] == value:
            continue
        if key == "instance_photos":
            raise TuneQDMError(f"{what} was trained on other photos (the --instance_data_dir files differ): "
                               "resume with the same photos, or start over with --force")
        raise TuneQDMError(f"{what} was made with another {key} ({theirs[key]!r}; this run: {value!r}): resume "
                           "with the same settings, or start over with --force")


def _photos_digest(subjects: list[Subject]) -> str:
    """SHA-256 of every subject's image files (names and bytes, in the order they are read): the photos by content,
    wherever the folder now is."""
    h = hashlib.sha256()
    for s in subjects:
        folder = Path(s.instance_data_dir)
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        for path in files:
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        h.update(b"\1")
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "class"


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log's rows up to ``step`` (a resumed run writes the later ones again); replaced by a rename."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-cut")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _start_over(out: Path) -> None:
    """--force: the old run's log, checkpoints and images go; its result stays until the new one replaces it."""
    (out / LOG).unlink(missing_ok=True)
    for name in ("checkpoints", "validation", TRACKER_LOGS):
        shutil.rmtree(out / name, ignore_errors=True)


def _check_process_precision(mixed_precision: str) -> None:
    """accelerate keeps one state per process (its ``Accelerator`` objects share it) and refuses to change its mixed
    precision; a second run in the same process reuses that state, so it must ask for the same precision."""
    from accelerate.state import AcceleratorState, is_initialized

    if is_initialized() and AcceleratorState().mixed_precision != mixed_precision:
        raise TuneQDMError(f"--mixed_precision {mixed_precision}: this process already trained with --mixed_precision "
                           f"{AcceleratorState().mixed_precision}, and accelerate keeps one per process: run this "
                           "training in a new process (e.g. the tuneqdm train command)")


def _quiet_libraries():
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def train(cfg: TrainConfig | None = None, callbacks=(), trainer: Trainer | None = None, **kwargs) -> Path:
    """Run one training; returns the output folder. ``train(TrainConfig(...))`` or ``train(instance_data_dir=...)``;
    ``trainer``: a ``Trainer`` of ``cfg`` to run (to read ``trainer.finished`` after)."""
    if cfg is None:
        cfg = TrainConfig(**kwargs)
    elif kwargs:
            cfg = replace(cfg, **kwargs)
    main = os.environ.get("RANK", "0") == "0"
    with warnings.catch_warnings(), quiet_while(cfg.quiet or not main), \
            output_lock(cfg.output_dir, "--output_dir") if main else contextlib.nullcontext():  # one run per folder
        warnings.simplefilter("always", TrainWarning)
        return (trainer or Trainer(cfg, callbacks)).setup().run()
