"""One component of a pipeline (a text encoder, the VAE, a float denoiser) built from its folder: on the meta device
(a skeleton: its config only), streamed (weights read per module as it runs: ``streamed``), or resident (loaded
whole, in the compute dtype, by its library's ``from_pretrained``).

Files name their classes (``model_index.json``: ``["transformers", "T5EncoderModel"]``); a class is taken only from
the exports of diffusers or transformers, and only when it is a model class, so a crafted file never gets an
arbitrary module imported.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TuneQDMError
from ..files import first_line
from ..libraries import dtype_kwarg, quiet_loading
from ..shards import header
from ..tuning.streaming import diffusers_model_class, empty_model
from .source import Source
from .streamed import placeholder, stream


def transformers_model_class(name) -> type[nn.Module] | None:
    """The model class transformers exports under exactly ``name`` (None when there is none)."""
    import transformers

    if not (isinstance(name, str) and name.isidentifier()):
        return None
    try:
        cls = getattr(transformers, name, None)
    except (ImportError, RuntimeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def model_class(source: Source, name: str) -> type[nn.Module]:
    library, class_name = source.components()[name]
    cls = {"diffusers": diffusers_model_class, "transformers": transformers_model_class}.get(library, lambda _: None)(
        class_name)
    if cls is None:
        raise TuneQDMError(f"{source.folder}/model_index.json names {library}.{class_name} for {name}, which is no "
                           "diffusers or transformers model: download the model again")
    return cls


def skeleton(source: Source, name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The component built from its config on the meta device (no weight allocated), in ``dtype``, in eval mode."""
    cls, folder = model_class(source, name), source.component_folder(name)
    fix = "download the model again"
    if hasattr(cls, "config_class"):  # transformers
        from accelerate import init_empty_weights

        try:
            config = cls.config_class.from_pretrained(folder)
            with init_empty_weights():
                model = cls(config)
        except Exception as e:  # noqa: BLE001 -- a foreign config.json can fail inside the model's constructor
            raise TuneQDMError(f"{folder}/config.json does not describe a {cls.__name__} ({first_line(e)}): {fix}"
                               ) from None
        model.tie_weights()
    else:
        model = empty_model(cls, source.config(name), folder / "config.json", fix)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()  # built in float32


def streamed(source: Source, name: str, device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The component with its weights read from its files module by module as it runs (``tuneqdm.loading.streamed``)."""
    return stream(skeleton(source, name, dtype), source.weight_files(name), device, dtype,
                  source.component_folder(name))


def resident(source: Source, name: str, device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The component loaded whole by its library, in ``dtype``, on ``device``."""
    cls = model_class(source, name)
    quiet_loading()
    kwargs = dtype_kwarg(dtype) if not hasattr(cls, "config_class") else {"dtype": dtype}
    variant = {"variant": source.variant_of(name)} if source.variant_of(name) else {}
    try:
        model = cls.from_pretrained(source.component_folder(name), **kwargs, **variant)
    except (OSError, ValueError, RuntimeError) as e:
        raise TuneQDMError(f"cannot load {source.component_folder(name)} ({first_line(e, None)}): download the model "
                           "again") from None
    return model.to(device).eval()


def stored_dtypes(source: Source, name: str) -> set[str]:
    """The safetensors dtypes (``"BF16"``, ``"F32"``...) a component's files store its tensors in."""
    return {info["dtype"] for shard in source.weight_files(name) for info in header(shard).values()}


def resident_vae(source: Source, device, dtype: torch.dtype = torch.float32, encoder: bool = True) -> nn.Module:
    """The VAE, resident; an ``AutoencoderKL`` stored in bfloat16 (as FLUX.1, SD3.5 and Chroma ship it) decodes in
    bfloat16 while the rest of the model (the encoder that caches training latents) runs in ``dtype``.

    Decoding is where ``generate`` peaks: at 512 px a float32 SD/FLUX decoder holds about 1.2 GB of activations on
    top of the model, bfloat16 half of that, from weights that are bfloat16 to begin with (docs/benchmarks/
    real_size.md gives the measured peak and the image difference). float16 and float32 files decode in ``dtype``:
    SD's float16 VAEs overflow.

    ``encoder`` False (a pipeline that only samples: text-to-image never encodes an image): an ``AutoencoderKL``'s
    encoder holds no weights, only one-value NaN placeholders of their shapes (``streamed.placeholder``: the VAE
    still reports its device and dtype, and a stray encode is loud)."""
    kl = model_class(source, "vae").__name__ == "AutoencoderKL"
    lean = kl and dtype == torch.float32 and stored_dtypes(source, "vae") == {"BF16"}
    vae = resident(source, "vae", device, torch.bfloat16 if lean else dtype)  # as stored: no float32 decoder copy
    unused = (vae.encoder, vae.quant_conv) if kl and not encoder else ()
    for part in vae.children():
        if any(part is u for u in unused):
            _hollow(part, dtype, device)
        elif lean and part is not vae.decoder:
            part.to(dtype)
    if lean:
        decode_in(vae.decoder, torch.bfloat16)
    return vae


def _hollow(module: nn.Module, dtype: torch.dtype, device) -> None:
    """Every parameter of ``module`` replaced by a placeholder of its shape (no memory)."""
    for owner in module.modules():
        for leaf, p in list(owner.named_parameters(recurse=False)):
            setattr(owner, leaf, nn.Parameter(placeholder(p.shape, dtype, device), requires_grad=False))


def decode_in(decoder: nn.Module, dtype: torch.dtype) -> None:
    """``decoder``'s weights and its computation in ``dtype``; what it is given is cast to ``dtype`` and what it
    returns back to the dtype it was given, so the pipeline around it is unchanged."""
    decoder.to(dtype)
    given: list[torch.dtype] = []

    def cast(value, to):
        return value.to(to) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def cast_in(_module, args, kwargs):
        given[:] = [a.dtype for a in (*args, *kwargs.values()) if cast(a, dtype) is not a][:1]
        return tuple(cast(a, dtype) for a in args), {k: cast(v, dtype) for k, v in kwargs.items()}

    def cast_back(_module, _args, _kwargs, output):
        return cast(output, given[0]) if given else output

    decoder.register_forward_pre_hook(cast_in, with_kwargs=True)
    decoder.register_forward_hook(cast_back, with_kwargs=True)
