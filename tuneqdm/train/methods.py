"""What trains: the quantization scales (peqa, tuneqdm, mcsu, tas, s1), LoRA on the float UNet (lora) or on
tuneqdm's frozen quantized UNet (qlora), or the whole UNet.

``prepare`` turns the pipeline's float UNet (or a saved quantized base) into the model to train and returns the
optimizer's parameter groups, each with its learning rate: for the scale methods each layer's ``s_out`` is its own
group at ``--learning_rate x RMS(original scales of that layer)`` (``scale_param_groups``), ``s_in`` (initialised to
1) at ``--learning_rate`` itself; the other methods have one group at ``--learning_rate``.
"""

from __future__ import annotations


import torch
from torch import nn

from ..errors import TuneQDMError
from ..quant.layers import QConv2d
from ..loading.denoiser import saved_quantized_denoiser
from ..serialization import fingerprint
from ..tuning import configure_, quantize_
from ..tuning.model import is_quantized, quant_state, scale_param_groups
from .config import LORA_TARGETS, TrainConfig


def kind(model: nn.Module) -> str:
    """How messages name the denoiser: UNet or transformer."""
    return "UNet" if "UNet" in type(model).__name__ else "transformer"


def load_quantized_base(directory, float_unet_config: dict | None = None, device="cpu") -> nn.Module:
    """A saved quantized base on ``device``, checked against the pipeline's UNet config when one is given."""
    return saved_quantized_denoiser(directory, float_unet_config, device)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a ``target_modules`` string: the whole name or its dotted suffix."""
    return name == target or name.endswith("." + target)


def check_lora_targets(unet: nn.Module, targets: list[str], quantized: bool) -> None:
    """One-line errors for targets that match no module, or (qlora) a module PEFT cannot wrap without a weight."""
    modules = dict(unet.named_modules())
    for t in targets:
        hits = [n for n in modules if _matches(n, t)]
        if not hits:
            raise TuneQDMError(f"--lora_targets {t!r} matches no module of the {kind(unet)}: give names such as "
                               f"{', '.join(LORA_TARGETS)}")
        if quantized and any(isinstance(modules[n], QConv2d) for n in hits):
            raise TuneQDMError(f"--lora_targets {t!r} matches a quantized Conv2d ({hits[0]}): qlora wraps Linear "
                               "layers only")


def check_lora_rank(model: nn.Module, rank: int, targets: list[str]) -> None:
    """One line when ``rank`` is above the full rank of a targeted layer (min of its inputs and outputs): such a
    "low-rank" update is no lower than the layer itself, and a huge rank allocates rank x width per layer. Read from
    the shapes only, so it runs on the meta-device skeleton before any weight loads."""
    smallest = None
    for name, module in model.named_modules():
        if not any(_matches(name, t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            full = min(module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            full = min(module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1],
                       module.out_channels)
        else:
            continue
        if smallest is None or full < smallest[0]:
            smallest = (full, name)
    if smallest is not None and rank > smallest[0]:
        raise TuneQDMError(f"--rank {rank} is above the full rank of the LoRA's layers ({smallest[1]} has rank "
                           f"{smallest[0]}): give --rank {smallest[0]} or less")


def add_lora(unet: nn.Module, rank: int, targets: list[str]) -> list[nn.Parameter]:
    """Freeze ``unet`` and add PEFT LoRA (diffusers' DreamBooth-LoRA init: gaussian A, zero B, alpha = rank); the
    LoRA parameters, in float32 whatever the base dtype."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise TuneQDMError("LoRA needs PEFT: pip install peft") from None
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def _quantize_for(unet: nn.Module, cfg: TrainConfig, num_train_timesteps: int, base_id: str | None) -> None:
    qc = cfg.quant_config(num_train_timesteps)
    if is_quantized(unet):  # a loaded --quantized_base
        base = quant_state(unet).config
        if (base.bits, base.init) != (cfg.bits, cfg.quant_init):
            raise TuneQDMError(f"--quantized_base is W{base.bits} {base.init}, but this run asks for "
                               f"--bits {cfg.bits} --quant_init {cfg.quant_init}: make them agree")
        configure_(unet, qc)
    else:
        quantize_(unet, qc)
    if base_id is not None:
        quant_state(unet).base_id = base_id


def prepare(unet: nn.Module, cfg: TrainConfig, num_train_timesteps: int, base_id: str | None) -> tuple[nn.Module, list]:
    """The model to train (in place where possible) and its optimizer parameter groups, each with its ``lr``."""
    if cfg.method == "qlora":
        check_lora_targets(unet, cfg.targets, quantized=is_quantized(unet))
        _quantize_for(unet, cfg, num_train_timesteps, base_id)
        check_lora_targets(unet, cfg.targets, quantized=True)
        fingerprint(unet)  # of the quantized base, cached before PEFT renames its layers (to_q -> to_q.base_layer)
        return unet, [{"params": add_lora(unet, cfg.rank, cfg.targets), "lr": cfg.lr}]
    if cfg.quantized:
        _quantize_for(unet, cfg, num_train_timesteps, base_id)
        # weight decay: AdamW's --adam_weight_decay (0 by default for scales), as for every method
        return unet, [{"params": g["params"], "lr": g["lr"]} for g in scale_param_groups(unet, lr=cfg.lr)]
    if cfg.method == "lora":
        check_lora_targets(unet, cfg.targets, quantized=False)
        return unet, [{"params": add_lora(unet, cfg.rank, cfg.targets), "lr": cfg.lr}]
    unet.requires_grad_(True)  # fp: full DreamBooth on the UNet
    return unet, [{"params": list(unet.parameters()), "lr": cfg.lr}]


def trainable_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by parameter name (what a checkpoint stores of the model)."""
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(unet: nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
    mine = trainable_state(unet)
    if set(mine) != set(tensors):
        odd = sorted(set(mine) ^ set(tensors))
        raise TuneQDMError(f"checkpoint {where} does not match this run's trainable parameters (e.g. {odd[0]!r}): "
                           "was it made with another --method, --experts or --rank?")
    for name, p in mine.items():
        t = tensors[name]
        if t.shape != p.shape:
            raise TuneQDMError(f"checkpoint {where}: {name} has shape {tuple(t.shape)}, this run has {tuple(p.shape)}")
        p.copy_(t)
