"""The settings of one training run (diffusers' DreamBooth names, plus the quantization ones), validated up front."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, fields

from ..errors import TuneQDMError
from ..files import check_prompt
from ..loading.options import (quantized_cache_option, revision_option, single_file_config_option,
                               text_encoders_option, variant_option)
from ..loading.pipeline import check_text_encoders
from ..options import option
from ..quant.bits import SUPPORTED_BITS
from ..quant.kernels import DYNAMIC_BITS, FLOAT_BITS, check_dynamic_bits
from ..quant.quantizer import INITS
from ..sampling import MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH_HELP, MAX_SIZE
from ..tuning.config import METHODS, QuantConfig, experts_problem, interval_problem

QUANTIZED_METHODS = tuple(METHODS)  # the scale methods
LORA_METHODS = ("lora", "qlora")  # PEFT LoRA on the float UNet / on tuneqdm's frozen quantized UNet
METHOD_CHOICES = ("fp", "lora", "qlora") + QUANTIZED_METHODS
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")

# Learning rates. For the scale methods --learning_rate is RELATIVE: each layer's s_out gets
# lr x (RMS of that layer's original quantization scales) and s_in (which starts at 1) gets lr itself, so that one
# number moves every scale by about the same fraction per Adam step whatever its magnitude (s_out spans ~1e-4..1e-1
# across the layers of one UNet and across bit widths: one absolute lr is a no-op for some layers and a blow-up for
# others). The paper's released recipe (absolute 3e-6 on W8 SD 1.4) is ~1e-3 relative on s_out and 3e-6 on s_in,
# which it thus hardly moves; measured on the tiny
# test pipeline (200 steps, batch 2, held-out eps-MSE from 1.140): 3e-4 -> 1.095, 1e-3 -> 1.005, 2e-3 -> 0.906,
# 5e-3 -> 0.702, 1e-2 -> 0.499, 3e-2 -> 0.315 (no divergence). 2e-3 is the default: a clear fit within 400 steps
# while a scale can drift at most ~0.2x per expert (100 steps of 4 experts), keeping the prior. tuneqdm's own is
# 6e-3: the fidelity benchmark's held-out rule (highest subject fidelity with the prompt fidelity kept within 0.01 of
# the untuned model's; docs/benchmarks/fidelity_lr_sweep.md) chose it on the embedded model before and after its VAE
# was refined, and 2e-3 for PEQA both times: 4 experts each see a quarter of the steps.
# LoRA: diffusers' DreamBooth-LoRA defaults (lr 1e-4, AdamW decay 1e-2), on the float or the quantized base alike.
DEFAULT_LR = {"fp": 5e-6, "lora": 1e-4, "qlora": 1e-4, **{m: 2e-3 for m in QUANTIZED_METHODS}, "tuneqdm": 6e-3}
DEFAULT_WEIGHT_DECAY = {"fp": 1e-2, "lora": 1e-2, "qlora": 1e-2,
                        **{m: 0.0 for m in QUANTIZED_METHODS}}  # decay would shrink W
DEFAULT_STEPS = 400
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate seeds numpy, Python and torch with the same number)
REPORT_TO = ("tensorboard",)
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler: the polynomial schedule decays to this
# settings whose change never changes the trained result (a resume may change them)
HARMLESS = ("output_dir", "resume_from_checkpoint", "force", "quiet", "report_to", "checkpointing_steps",
            "checkpoints_total_limit", "validation_prompt", "num_validation_images", "validation_steps",
            "validation_inference_steps", "gradient_checkpointing", "sample_batch_size", "quantized_base",
            "quantized_cache", "text_encoders",
            "instance_data_dir", "subjects", "pretrained_model_name_or_path", "single_file_config")
# settings that shape only some models' runs: the trainer records them for the bases they apply to
MODEL_SETTINGS = ("max_sequence_length", "weighting_scheme", "logit_mean", "logit_std", "mode_scale")
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' DreamBooth-LoRA scripts (UNets, Flux, SD3, PixArt)
# flow-matching models: how sigma is drawn (diffusers' train_dreambooth_lora_flux.py/_sd3.py names; "none": uniform)
WEIGHTING_SCHEMES = ("logit_normal", "none", "mode", "cosmap", "sigma_sqrt")


def _lr(method: str) -> str:
    """A default learning rate as the help text writes it: 6e-3, not 0.006."""
    mantissa, exponent = f"{DEFAULT_LR[method]:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


LR_HELP = (f"default: RELATIVE for scale methods (each layer's s_out moves by lr x its RMS): {_lr('tuneqdm')} for "
           f"tuneqdm, {_lr('peqa')} for peqa, mcsu, tas and s1; {_lr('lora')} for lora and qlora, {_lr('fp')} for fp")


@dataclass
class TrainConfig:
    """The ``tuneqdm train`` settings; each field is its flag (``tuneqdm.options``)."""

    # model
    pretrained_model_name_or_path: str | None = option(  # None: the embedded toy pipeline
        None, "a local diffusers folder or hub id (default: the embedded toy pipeline)")
    revision: str | None = revision_option()  # of a hub id (diffusers' from_pretrained)
    variant: str | None = variant_option()  # e.g. "fp16": the model's *.fp16.safetensors files
    single_file_config: str | None = single_file_config_option()  # where a single-file checkpoint's configs come from
    method: str = option("tuneqdm", "what trains: quantization scales (peqa, tuneqdm, mcsu, tas, s1), LoRA on the "
                         "float UNet (lora) or on the frozen quantized UNet (qlora), or the full UNet (fp)",
                         choices=METHOD_CHOICES)
    bits: int = option(4, "weight bits of the quantized UNet (default 4)", choices=SUPPORTED_BITS)
    experts: int | None = option(None, "timestep experts K (default: 4 for tuneqdm and tas, else 1)")
    s1_intervals: str | None = option(  # "0-250" or "0-250,600-800" (method s1)
        None, "method s1: timestep intervals A-B[,C-D] where the tuned scales apply")
    quant_init: str = option("mse", "quantizer initialisation (default mse)", choices=INITS)
    activation_bits: int = option(  # 8: int8 activations and integer matmuls in every quantized layer; 16: float
        FLOAT_BITS, f"{DYNAMIC_BITS}: every quantized layer's input to int8 (dynamic, per token) and integer matmuls, "
        f"in training and, by default, when `generate` samples the result; {FLOAT_BITS}: float activations "
        f"(quantized methods and qlora; default {FLOAT_BITS})")
    quantized_base: str | None = option(None, "a folder of tuneqdm.save_quantized to start from (skips quantizing)")
    text_encoders: str | None = text_encoders_option(train=True)  # None: stream with the memory savers, else resident
    quantized_cache: str | bool | None = quantized_cache_option()  # None: the default folder; False: none
    rank: int = option(4, "LoRA rank (methods lora and qlora, default 4)")
    lora_targets: str | None = option(  # comma-separated module names (PEFT target_modules); None: diffusers' four
        None, "LoRA target modules, comma-separated (default: to_k,to_q,to_v,to_out.0)")
    # data
    instance_data_dir: str | None = option(None, "folder of 3-6 photos of the subject")
    instance_prompt: str | None = option(
        None, "prompt with a rare identifier, e.g. 'a sks dog' (default: the folder's subject.json)")
    subjects: str | None = option(
        None, 'JSON list of {"instance_data_dir", "instance_prompt"}: one adapter for several subjects')
    with_prior_preservation: bool = option(False, "add the class-prior loss (DreamBooth)")
    class_data_dir: str | None = option(
        None, "class images; missing ones are generated (default OUTPUT/class_images)")
    class_prompt: str | None = option(None, "e.g. 'a dog' (default: the folder's subject.json)")
    num_class_images: int = option(100)
    prior_loss_weight: float = option(1.0)
    sample_batch_size: int = option(4, "batch size when generating class images")
    prior_inference_steps: int = option(25, "sampling steps per generated class image")
    resolution: int | None = option(  # None: the pipeline's native size
        None, "square training size, a multiple of 8 up to 8192 that the model takes (default: native)")
    center_crop: bool = option(False, "centre crops instead of seeded random crops")
    memory_savers: bool | None = option(  # None: on for the quantized methods, off for fp/lora
        None, "cache latents and prompt embeddings, then release the VAE and text encoders "
              "(default: on for quantized methods, off for fp/lora)", action=argparse.BooleanOptionalAction)
    max_sequence_length: int | None = option(  # T5 tokens of a prompt (None: the pipeline's own, e.g. Flux 512)
        None, MAX_SEQUENCE_LENGTH_HELP)
    # flow-matching objective (FlowMatchEulerDiscreteScheduler: Flux, SD3); ignored by DDPM-family schedulers
    weighting_scheme: str = option(
        "logit_normal", "flow-matching models (Flux, SD3): how sigma is drawn, diffusers' names ('none': uniform)",
        choices=WEIGHTING_SCHEMES)
    logit_mean: float = option(0.0, "mean of --weighting_scheme logit_normal")
    logit_std: float = option(1.0, "std of --weighting_scheme logit_normal")
    mode_scale: float = option(1.29, "scale of --weighting_scheme mode")
    # optimisation
    train_batch_size: int = option(1, "per process")
    max_train_steps: int = option(DEFAULT_STEPS)
    learning_rate: float | None = option(None, LR_HELP)
    lr_scheduler: str = option("constant", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0)
    lr_num_cycles: int = option(1)
    lr_power: float = option(1.0)
    adam_beta1: float = option(0.9)
    adam_beta2: float = option(0.999)
    adam_weight_decay: float | None = option(None, "default: 0 for scales, 1e-2 for fp/lora")
    adam_epsilon: float = option(1e-8)
    max_grad_norm: float = option(1.0)
    gradient_accumulation_steps: int = option(1)
    gradient_checkpointing: bool = option(False)
    mixed_precision: str = option("no", choices=MIXED_PRECISION)
    seed: int = option(0, "0 to 2**32 - 1 (numpy's range); the run is a function of it")
    # outputs
    output_dir: str = option("tuneqdm-model")
    checkpointing_steps: int = option(500)
    checkpoints_total_limit: int | None = option(None)
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder")
    validation_prompt: str | None = option(None)
    num_validation_images: int = option(4)
    validation_steps: int = option(100)
    validation_inference_steps: int = option(25)
    quiet: bool = option(False, "no progress bar or messages")
    force: bool = option(False, "start over in an --output_dir that holds a run")
    report_to: str | None = option(  # "tensorboard": accelerate's tracker beside train_log.jsonl
        None, "also log loss and lr to TensorBoard (OUTPUT/logs; needs `pip install tensorboard`); "
              "train_log.jsonl is always written", choices=REPORT_TO)

    def __post_init__(self):
        if self.method not in METHOD_CHOICES:
            raise TuneQDMError(f"unknown --method {self.method!r}: choose one of {', '.join(METHOD_CHOICES)}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8 or self.resolution > MAX_SIZE):
            raise TuneQDMError(f"--resolution must be a positive multiple of 8 up to {MAX_SIZE}, got {self.resolution}")
        for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                     "validation_steps", "num_validation_images", "sample_batch_size", "rank",
                     "prior_inference_steps", "validation_inference_steps", "lr_num_cycles"):
            if getattr(self, name) < 1:
                raise TuneQDMError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.num_class_images < 0 or self.lr_warmup_steps < 0:
            raise TuneQDMError("--num_class_images and --lr_warmup_steps cannot be negative")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise TuneQDMError(f"--checkpoints_total_limit must be at least 1, got {self.checkpoints_total_limit}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise TuneQDMError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise TuneQDMError(f"--seed must be an integer from 0 to {MAX_SEED}, got {self.seed}")
        if self.report_to not in (None, "none", *REPORT_TO):
            raise TuneQDMError(f"--report_to {self.report_to!r}: choose {', '.join(REPORT_TO)} (train_log.jsonl "
                               "is always written)")
        if self.text_encoders is not None:
            check_text_encoders(self.text_encoders)
        self._check_optimizer()
        _check_flow(self)
        self._check_schedule()
        self._check_inputs()
        self._check_method()
        # bits, quantizer init and the rest by QuantConfig's own checks (T is the scheduler's, known once its config
        # is read: the intervals and --experts are checked against it then, by ``experts_beyond``)
        self.quant_config(max([1000, self.experts or 1, *(b for _, b in self.intervals)]))

    def _check_optimizer(self):
        """AdamW's and the loss's numbers, before anything loads (torch would fail after the model has loaded)."""
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise TuneQDMError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.learning_rate is not None and not math.isfinite(self.learning_rate):
            raise TuneQDMError(f"--learning_rate must be finite, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise TuneQDMError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not (self.adam_epsilon > 0 and math.isfinite(self.adam_epsilon)):
            raise TuneQDMError(f"--adam_epsilon must be a positive finite number, got {self.adam_epsilon}")
        for name in ("adam_weight_decay", "max_grad_norm", "prior_loss_weight"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise TuneQDMError(f"--{name} must be a finite number >= 0, got {value}")

    def _check_schedule(self):
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise TuneQDMError(f"unknown --lr_scheduler {self.lr_scheduler!r}: "
                               f"choose one of {', '.join(LR_SCHEDULERS)}")
        if self.lr_scheduler != "polynomial":
            return
        if not (self.lr_power > 0 and math.isfinite(self.lr_power)):
            raise TuneQDMError(f"--lr_power must be a positive finite number for --lr_scheduler polynomial, "
                               f"got {self.lr_power}")
        if self.lr_warmup_steps >= self.max_train_steps:
            raise TuneQDMError(f"--lr_warmup_steps ({self.lr_warmup_steps}) must be below --max_train_steps "
                               f"({self.max_train_steps}) for --lr_scheduler polynomial")
        if self.lr <= POLYNOMIAL_LR_END:
            raise TuneQDMError(f"--lr_scheduler polynomial decays to {POLYNOMIAL_LR_END}: --learning_rate must be "
                               f"above it, got {self.lr}")

    def _check_inputs(self):
        for flag in ("instance_prompt", "class_prompt", "validation_prompt"):  # before anything loads or trains
            check_prompt(getattr(self, flag), f"--{flag}")
        if self.subjects and (self.instance_data_dir or self.instance_prompt):
            raise TuneQDMError("give either --subjects or --instance_data_dir/--instance_prompt, not both")
        if not self.subjects and not self.instance_data_dir:
            raise TuneQDMError("--instance_data_dir is required (or --subjects FILE for several subjects)")

    def _check_method(self):
        if check_dynamic_bits(self.activation_bits) != FLOAT_BITS and not self.quantized:
            raise TuneQDMError(f"--activation_bits {self.activation_bits} applies to the quantized methods "
                               f"({', '.join(QUANTIZED_METHODS)}, qlora), not --method {self.method}: "
                               f"use --activation_bits {FLOAT_BITS}")
        if self.lora_targets is not None and self.method not in LORA_METHODS:
            raise TuneQDMError(f"--lora_targets applies to --method lora or qlora, not {self.method}")
        if self.lora_targets is not None and not self.targets:
            raise TuneQDMError(f"--lora_targets {self.lora_targets!r} names no module: give e.g. to_q,to_v")
        if not self.quantized and self.quantized_base:
            raise TuneQDMError(f"--quantized_base applies to the quantized methods, not --method {self.method}")
        if self.method == "s1" and not self.s1_intervals:
            raise TuneQDMError("--method s1 needs --s1_intervals, e.g. --s1_intervals 0-250")
        if self.method != "s1" and self.s1_intervals:
            raise TuneQDMError(f"--s1_intervals applies to --method s1 only, not {self.method}")
        for a, b in self.intervals:  # parse now: a bad value is reported before anything loads
            if interval_problem(a, b) == "order":  # QuantConfig's rule; the base's T is checked once it is known
                raise TuneQDMError(f"--s1_intervals {self.s1_intervals!r}: each interval A-B needs A < B")
        if self.experts is None:
            return
        if not self.trains_scales:
            raise TuneQDMError(f"--experts applies to the scale methods, not --method {self.method}")
        problem = experts_problem(self.method, self.experts)  # QuantConfig's rule, in the CLI's words
        if problem is not None:
            raise TuneQDMError({"one": f"--method {self.method} uses one scale set: --experts must be 1, got "
                                       f"{self.experts}",
                                "positive": f"--experts must be at least 1, got {self.experts}",
                                "many": f"--method {self.method} needs --experts 2 or more, got {self.experts}"}[problem])

    def experts_beyond(self, num_train_timesteps: int) -> None:
        """--experts against the base scheduler's T (read from its config before any model is built)."""
        if self.experts is not None and experts_problem(self.method, self.experts, num_train_timesteps) == "beyond":
            raise TuneQDMError(f"--experts {self.experts} is more than this base's {num_train_timesteps} training "
                               f"timesteps: give at most {num_train_timesteps} (one expert per timestep)")

    def quant_config(self, num_train_timesteps: int) -> QuantConfig:
        """The quantization of the run; qlora's base keeps its original scales (one set, frozen: ``peqa``'s layout),
        and fp/lora have none (``peqa``'s layout validates their --bits and --quant_init all the same)."""
        method = self.method if self.trains_scales else "peqa"
        experts = self.experts if self.trains_scales else None
        return QuantConfig(bits=self.bits, method=method, experts=experts, init=self.quant_init,
                           intervals=self.intervals, num_train_timesteps=num_train_timesteps)

    @property
    def resolved_experts(self) -> int | None:
        """K as trained: the method's default when not given (None for fp, lora and qlora)."""
        if not self.trains_scales:
            return None
        return self.experts if self.experts is not None else METHODS[self.method].default_experts

    def resolved_settings(self) -> dict:
        """Every setting that shapes the trained result, with defaults filled in: what a resume must not change.
        (The subjects, the base's fingerprint, the resolution and the MODEL_SETTINGS that apply to the base are
        resolved by the trainer.)"""
        out = {k: v for k, v in self.to_dict().items() if k not in HARMLESS + MODEL_SETTINGS}
        out.update(learning_rate=self.lr, adam_weight_decay=self.weight_decay, memory_savers=self.savers,
                   experts=self.resolved_experts, s1_intervals=[list(i) for i in self.intervals])
        for name in ("instance_prompt", "class_prompt", "resolution"):  # resolved by the trainer
            out.pop(name)
        if not self.quantized:
            for name in ("bits", "quant_init"):
                out[name] = None
        out["lora_targets"] = sorted(self.targets) if self.method in LORA_METHODS else None  # resolved
        if self.method not in LORA_METHODS:
            out["rank"] = None
        if not self.with_prior_preservation:
            for name in ("class_data_dir", "num_class_images", "prior_loss_weight", "prior_inference_steps"):
                out[name] = None
        else:
            out["class_data_dir"] = None  # its images' names and count are what matter, not where they are
        first = ("method", "lr_scheduler", "with_prior_preservation")  # named first when they differ: they gate others
        out = {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}
        schedule = self.lr_scheduler
        if schedule == "constant":
            out["lr_warmup_steps"] = None
        if schedule in ("constant", "constant_with_warmup"):
            out["max_train_steps"] = None  # a longer run repeats the shorter one's steps: extending is a resume
        if schedule != "cosine_with_restarts":
            out["lr_num_cycles"] = None
        if schedule != "polynomial":
            out["lr_power"] = None
        return out

    @property
    def quantized(self) -> bool:
        """The UNet is tuneqdm-quantized (the scale methods and qlora)."""
        return self.method in QUANTIZED_METHODS or self.method == "qlora"

    @property
    def trains_scales(self) -> bool:
        return self.method in QUANTIZED_METHODS

    @property
    def targets(self) -> list[str]:
        """The LoRA target modules (PEFT suffix names): ``--lora_targets`` or diffusers' DreamBooth-LoRA four."""
        if self.lora_targets is None:
            return list(LORA_TARGETS)
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    @property
    def weight_decay(self) -> float:
        return self.adam_weight_decay if self.adam_weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.method]

    @property
    def savers(self) -> bool:
        return self.memory_savers if self.memory_savers is not None else self.quantized

    @property
    def encoders(self) -> str:
        """How the text encoders are held: streamed from their files when they encode each prompt once (the memory
        savers), resident when they encode every batch."""
        return self.text_encoders or ("stream" if self.savers else "resident")

    @property
    def intervals(self) -> tuple[tuple[int, int], ...]:
        if not self.s1_intervals:
            return ()
        out = []
        for part in self.s1_intervals.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", part)
            if not m:
                raise TuneQDMError(f"--s1_intervals {self.s1_intervals!r}: write intervals as A-B[,C-D], e.g. 0-250")
            out.append((int(m.group(1)), int(m.group(2))))
        return tuple(out)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _check_flow(config: TrainConfig) -> None:
    """The flow-matching objective's settings (and the T5 prompt length)."""
    if config.weighting_scheme not in WEIGHTING_SCHEMES:
        raise TuneQDMError(f"unknown --weighting_scheme {config.weighting_scheme!r}: choose one of "
                           f"{', '.join(WEIGHTING_SCHEMES)}")
    if not (config.logit_std > 0 and math.isfinite(config.logit_std) and math.isfinite(config.logit_mean)):
        raise TuneQDMError(f"--logit_mean must be finite and --logit_std positive and finite, got "
                           f"{config.logit_mean} and {config.logit_std}")
    if not math.isfinite(config.mode_scale):
        raise TuneQDMError(f"--mode_scale must be finite, got {config.mode_scale}")
    if config.max_sequence_length is not None and not 1 <= config.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise TuneQDMError(f"--max_sequence_length {config.max_sequence_length}: give 1 to {MAX_SEQUENCE_LENGTH} T5 "
                           "tokens, or leave it out for the pipeline's own")
