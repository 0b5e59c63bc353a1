"""Z-Image: a Qwen3 encoder read at its second-to-last hidden layer on the prompt in the tokenizer's chat template,
kept at each prompt's own length (a list of variable-length caption features), latents passed as a list of
``[C, 1, H, W]`` tensors, the timestep ``1 - sigma`` (the argument named ``t``) and the output negated by the
pipeline: the flow velocity is minus what the transformer returns. Classifier-free guidance whenever the scale is
above 0 (default 5.0), both halves in one call."""

from __future__ import annotations

import torch

from ..errors import TuneQDMError
from .base import Family


class ZImage(Family):
    name = "zimage"
    label = "Z-Image"
    example_model = "Z-Image-Turbo"
    pipelines = ("ZImagePipeline",)
    denoisers = ("ZImageTransformer2DModel",)
    guidance = 5.0
    t5_tokenizer = "tokenizer"
    encoder_word = "Qwen3"
    start_token = False
    size_from_vae = True  # its transformer has no size; the pipeline would otherwise assume 1024 px
    timestep_argument = "t"
    first_last = ("all_x_embedder.2-1", "all_final_layer.2-1.linear")
    float_layers = ("t_embedder.mlp.0",)  # its timestep embedder casts to this Linear's weight dtype
    adaround_blocked = "takes its latents and captions as lists of per-sample tensors, each caption at its own length"

    def check(self, pipe) -> None:
        check_chat_template(pipe)

    def max_size(self, pipe) -> tuple[int, str] | None:
        """Its rotary table has ``axes_lens[1]`` rows and ``axes_lens[2]`` columns of patch positions (axis 0 is the
        caption's): an image with more patches per side indexes past it."""
        config = pipe.transformer.config
        lens, patches = getattr(config, "axes_lens", None), getattr(config, "all_patch_size", None)
        if not (isinstance(lens, (list, tuple)) and len(lens) == 3 and isinstance(patches, (list, tuple)) and patches):
            return None
        cells, patch = min(lens[1], lens[2]), patches[0]
        return cells * patch * self.vae_factor(pipe), f"axes_lens {cells} rotary positions of {patch}x{patch} latents"

    def encode_prompt(self, pipe, prompt, resolution, device, max_sequence_length) -> dict:
        emb, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False,
                                    max_sequence_length=self.prompt_limit(pipe, max_sequence_length))
        return {"cap_feats": emb[0]}

    def batch_kwargs(self, rows, device, context) -> dict:
        """Caption features stay a list: each prompt keeps its own length, as the pipeline passes them."""
        return {"cap_feats": [r["cap_feats"].to(device) for r in rows]}

    def timestep_conversion(self, model) -> tuple[float, float]:
        return 1000.0, -1000.0  # it takes 1 - sigma: training t = 1000 - 1000·t

    def sampling_sigmas(self, pipe, steps):
        from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

        return get_default_z_image_sigmas(steps)

    def predict(self, model, x, t, cond, context):
        """The pipeline's call: one ``[C, 1, H, W]`` latent per sample, positional arguments, the output negated.

        The transformer packs every sample's tokens into one sequence for its embedders, so a quantized layer there
        cannot give each sample its own timestep expert: a batch of several timesteps runs one call per timestep
        (samples that share one, as the guidance halves do, share a call)."""
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        out = torch.empty_like(x)
        for value in torch.unique(t):
            rows = (t == value).nonzero().flatten()
            y = model(list(x[rows].unsqueeze(2).unbind(0)), self.to_model_timestep(model, t[rows]),
                      [cond["cap_feats"][i] for i in rows.tolist()], return_dict=False)[0]
            out[rows] = -torch.stack(y).squeeze(2).to(out.dtype)
        return out


def check_chat_template(pipe) -> None:
    """The prompt is read in the tokenizer's chat template: one line when the tokenizer has none."""
    if getattr(pipe, "tokenizer", None) is not None and not getattr(pipe.tokenizer, "chat_template", None):
        raise TuneQDMError(f"the tokenizer of this {type(pipe).__name__} has no chat template, which its prompts are "
                           "read in: use the tokenizer the model was published with (tokenizer/chat_template.jinja)")


FAMILIES = (ZImage(),)
