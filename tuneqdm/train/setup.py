"""Everything a training run builds before its first step, one phase at a time: the checks that need no model, the
accelerator, the examples encoded by the base's pipeline (its denoiser a skeleton), the denoiser to train, what
trains on it with its optimizer and lr schedule, and the resumed state. ``Trainer`` (``loop``) adds the loop."""

from __future__ import annotations

import contextlib
import gc
import sys
import warnings
from pathlib import Path

import torch

from ..errors import TuneQDMError
from ..families import check_size, denoiser, native_size
from ..loading import (QuantizedCache, Source, assemble, denoiser_skeleton, float_denoiser, float_fingerprint,
                       quantized_denoiser, resolve)
from ..loading.inspection import base_facts
from ..memory import PhaseMemory, pin_mmap_threshold
from ..progress import stage
from ..quant.kernels import DYNAMIC_BITS
from ..quant.paths import DynamicActivations
from ..serialization import fingerprint
from ..tuning.config import interval_problem
from . import checkpoint as ckpt
from .accelerator import check_tracker, make_accelerator, quiet_libraries
from .batches import Batches
from .cache import TrainingTensors, release
from .config import LORA_METHODS, TrainConfig
from .data import Subject, load_folder
from .examples import Examples, build_examples, check_subjects, read_subjects, validation_prompt
from .methods import check_lora_rank, kind, load_quantized_base, load_trainable_state, prepare
from .objective import objective
from .prior import ensure_class_images
from .run_folder import (TRACKER_LOGS, check_output_dir, is_finished_or_refused, model_identity, model_settings,
                         refuse_changes, remove_stale_run_temporaries, settings_identity)


class TrainingSetup:
    """What one run builds before its first step: ``setup`` checks the inputs, then builds the pipeline, the examples
    and the optimizer and resumes. Every attribute is declared here; ``setup`` fills them in, step by step."""

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
        self.identity: dict = {}  # the resolved settings a resume must share (run_folder.settings_identity)
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
        self.batches: Batches | None = None  # every micro-step's draws
        # what trains
        self.unet = None  # the denoiser as accelerate prepared it (wrapped for data parallel)
        self.model = None  # the same denoiser, unwrapped
        self.params: list[torch.nn.Parameter] = []
        self.optimizer = None
        self.lr_scheduler = None
        self.fingerprint: str | None = None  # of the frozen base the result belongs to

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
        T = base_facts(self.source).num_train_timesteps
        if T is not None:
            self.cfg.experts_beyond(T)
        for a, b in self.cfg.intervals if T is not None else ():
            if interval_problem(a, b, T) == "beyond":
                raise TuneQDMError(f"--s1_intervals {self.cfg.s1_intervals!r}: this base has {T} timesteps, so an "
                                   f"interval must end at {T} or below")

    def _model_settings(self) -> dict:
        """The settings only some bases' runs have (``run_folder.model_settings``), for this base."""
        return model_settings(self.cfg, base_facts(self.source))

    def _accelerator(self):
        return make_accelerator(self.cfg, self.out, self.out / TRACKER_LOGS)

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
        self.identity = settings_identity(cfg, self._model_settings(), self.acc.num_processes, self.base_id,
                                          self.subjects)
        self.finished = is_finished_or_refused(self.out, cfg, self.identity, self.resume_path, self.main)
        if self.finished:
            return self
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        with self.memory.phase("encode"):
            pipe = self._build_pipeline()
            self.examples = build_examples(cfg, self.subjects, self.resolution, self._class_root(),
                                           lambda prompt, folder: self._class_photos(pipe, prompt, folder))
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
        """Stale temporaries removed, the output folder and the checkpoint to resume checked, the subjects read and
        checked, the tracker's package and the base's files checked."""
        cfg = self.cfg
        remove_stale_run_temporaries(self.out)
        check_output_dir(self.out, cfg)
        self.resume_path = ckpt.resolve(self.out, cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
        self.subjects = read_subjects(cfg)
        self.validation_prompt = validation_prompt(cfg, self.subjects)
        check_subjects(cfg, self.subjects)
        check_tracker(cfg)
        self._check_base()

    def _start_accelerator(self):
        self.acc = self._accelerator()
        self.main = self.acc.is_main_process
        if not self.main or self.cfg.quiet:
            quiet_libraries()

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
        cfg, ex, acc = self.cfg, self.examples, self.acc
        images = len(ex.instance_pixels) + (0 if ex.class_pixels is None else len(ex.class_pixels))
        with stage(f"encoding {images} images and {len(ex.prompts)} prompts"):
            self.tensors = TrainingTensors(pipe, ex.instance_pixels, ex.class_pixels, ex.prompts, self.resolution,
                                           acc.device, memory_savers=cfg.savers,
                                           max_sequence_length=cfg.max_sequence_length)
        self.objective = objective(pipe, cfg)
        self.T = self.objective.T
        self.batches = Batches(cfg, ex, self.tensors, self.objective, acc.num_processes, acc.process_index,
                               acc.device)

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

    def _class_root(self) -> Path:
        """Where the class images are read and generated: --class_data_dir, or the output folder's class_images."""
        return Path(self.cfg.class_data_dir) if self.cfg.class_data_dir else self.out / "class_images"

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

    def _resume(self):
        """The checkpoint's trainable tensors, optimizer, lr schedule, RNG states and step (when there is one)."""
        path = self.resume_path
        if path is None:
            return
        tensors, meta = ckpt.load(path)
        refuse_changes(meta.get("identity"), model_identity(self.fingerprint, self.resolution), f"checkpoint {path}")
        load_trainable_state(self.model, ckpt.model_tensors(tensors), path)
        ckpt.restore(tensors, meta, self.optimizer, self.lr_scheduler)
        self.step = int(meta["step"])
        self.resumed_from = path

