"""The merged denoiser as one ``.safetensors`` in the original layout that diffusers' ``from_single_file`` (and
ComfyUI, A1111) read: the LDM layout of SD 1.x/2.x and SDXL UNets (``model.diffusion_model.input_blocks...``).

The names are diffusers' own conversion run backwards: the fixed layers from diffusers' ``DIFFUSERS_TO_LDM_MAPPING``,
the blocks by the LDM numbering diffusers' ``convert_ldm_unet_checkpoint`` reads (``input_blocks.{b(L+1)+l+1}`` for
down block b's layer l, L layers per block, ...). Every file is checked before it is written by running diffusers'
converter on it: it must give back every tensor of the model under its own name, or the export fails in one line.
"""

from __future__ import annotations

import torch

from ..errors import TuneQDMError
from ..families import family_of_model

LDM_PREFIX = "model.diffusion_model."
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def check_single_file(model) -> None:
    """One line for a denoiser whose original single-file layout tuneqdm does not write."""
    name, fam = type(model).__name__, family_of_model(model)
    if fam is None or not fam.single_file:
        raise TuneQDMError(f"--single_file writes the original (LDM) layout of SD 1.x/2.x and SDXL UNets; this "
                           f"denoiser is a {name}: use the model folder (from_pretrained) instead")
    lpb = model.config.layers_per_block
    if not isinstance(lpb, int):
        raise TuneQDMError(f"--single_file: this UNet has per-block layer counts {lpb}, which the LDM layout cannot "
                           "number: use the model folder (from_pretrained) instead")


def _block_prefixes(config) -> list[tuple[str, str, bool]]:
    """(diffusers prefix, LDM prefix, is a resnet) of every block of an SD-style UNet."""
    lpb, blocks = config.layers_per_block, len(config.block_out_channels)
    out = []
    for b in range(blocks):
        for l in range(lpb):
            i = b * (lpb + 1) + l + 1
            out += [(f"down_blocks.{b}.resnets.{l}.", f"input_blocks.{i}.0.", True),
                    (f"down_blocks.{b}.attentions.{l}.", f"input_blocks.{i}.1.", False)]
        out.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.", False))
    out += [("mid_block.resnets.0.", "middle_block.0.", True), ("mid_block.attentions.0.", "middle_block.1.", False),
            ("mid_block.resnets.1.", "middle_block.2.", True)]
    for b in range(blocks):
        attention = "CrossAttn" in config.up_block_types[b]
        for l in range(lpb + 1):
            i = b * (lpb + 1) + l
            out += [(f"up_blocks.{b}.resnets.{l}.", f"output_blocks.{i}.0.", True),
                    (f"up_blocks.{b}.attentions.{l}.", f"output_blocks.{i}.1.", False)]
        last = b * (lpb + 1) + lpb
        out.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{last}.{2 if attention else 1}.conv.", False))
    return out


def ldm_name(key: str, fixed: dict[str, str], prefixes) -> str | None:
    """The LDM name of a diffusers UNet tensor (None: no LDM name)."""
    if key in fixed:
        return fixed[key]
    for new, old, resnet in prefixes:
        if key.startswith(new):
            rest = key[len(new):]
            if resnet:
                for a, b in _RESNET:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
            return old + rest
    return None


def unet_to_ldm(model) -> dict[str, torch.Tensor]:
    """The UNet's tensors under their LDM names (``model.diffusion_model.`` prefixed), checked against diffusers'
    own LDM-to-diffusers conversion."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_ldm_unet_checkpoint

    config = model.config
    table = DIFFUSERS_TO_LDM_MAPPING["unet"]
    fixed = dict(table["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(table["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        fixed.update(table["class_embed_type"])
    prefixes = _block_prefixes(config)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    ldm = {}
    for key, tensor in state.items():
        name = ldm_name(key, fixed, prefixes)
        if name is None:
            raise TuneQDMError(f"--single_file: {key} has no place in the LDM layout: use the model folder instead")
        ldm[LDM_PREFIX + name] = tensor
    back = convert_ldm_unet_checkpoint(ldm, dict(config))
    if set(back) != set(state) or any(back[k] is not state[k] for k in state):
        odd = sorted(set(back) ^ set(state))[:3]
        raise TuneQDMError(f"--single_file: diffusers does not read this UNet back from the LDM layout (e.g. {odd}): "
                           "use the model folder instead")
    return ldm


def write_single_file(model, folder) -> str:
    """Write ``<folder>/<component>.safetensors`` in the original layout; its file name."""
    from safetensors.torch import save_file

    tensors = unet_to_ldm(model)
    name = "unet.safetensors"
    save_file(tensors, folder / name, metadata={"format": "pt"})
    return name
