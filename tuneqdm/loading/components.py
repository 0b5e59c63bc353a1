"""One component of a pipeline (a text encoder, the VAE, a float denoiser) built from its folder: on the meta device
(a skeleton: its config only), streamed (weights read per module as it runs: ``streamed``), or resident (loaded
whole, in the compute dtype, by its library's ``from_pretrained``).

Files name their classes (``model_index.json``: ``["transformers", "T5EncoderModel"]``); a class is taken only from
the exports of diffusers or transformers, and only when it is a model class, so a crafted file never gets an
arbitrary module imported.
"""

from __future__ import annotations

import collections.abc
import json
import re
import types
import typing

import torch
from torch import nn

from ..errors import TuneQDMError
from ..files import first_line
from ..libraries import dtype_kwarg, quiet_loading
from ..shards import header
from ..tuning.streaming import diffusers_model_class, empty_model, exported_class
from .source import Source
from .streamed import placeholder, stream


def transformers_model_class(name) -> type[nn.Module] | None:
    """The model class transformers exports under exactly ``name`` (None when there is none)."""
    return exported_class("transformers", name, ("PreTrainedModel",))


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


def diffusers_config_class(name) -> type | None:
    """The diffusers model or scheduler class exported under exactly ``name`` (None when there is none)."""
    return exported_class("diffusers", name, ("ModelMixin", "SchedulerMixin"))


def _fits(value, hint) -> bool:
    """Whether a JSON ``value`` is of the annotated type ``hint`` (what is not understood here passes: a check
    against false alarms, not a type system). ``None`` always passes: diffusers annotates many optional settings
    without ``Optional``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None or hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, list):
            return False
        if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
            return all(_fits(v, args[0]) for v in value)
        return len(args) != len(value) or all(_fits(v, a) for v, a in zip(value, args))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True


def check_config(source: Source, name: str) -> None:
    """One line when a diffusers component's configuration sets a value of another type than its constructor
    declares (a list where a number goes, a string for a flag): before, such a value failed deep inside the model's
    forward or the scheduler (``padding=[]``, ``'bool' object has no attribute``) with a traceback."""
    library, class_name = source.components()[name]
    cls = diffusers_config_class(class_name) if library == "diffusers" else None
    if cls is None:
        return
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 -- an annotation this Python cannot resolve: nothing to check against
        return
    config = source.config(name)
    for key, value in config.items():
        if key in hints and not _fits(value, hints[key]):
            raise TuneQDMError(f"the {name} configuration of {source.title} sets {key} to "
                               f"{json.dumps(value)[:60]}, which {class_name} does not take (it expects "
                               f"{_hint_text(hints[key])}): download the model again, or restore its config")


def _hint_text(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


_CHECKED: set = set()  # (component folder, config and shard sizes and times) already checked in this process


def check_weights(source: Source, name: str) -> None:
    """One line when a model component's files and its config disagree: the files hold a tensor the model its
    config describes does not have, lack one it has (tied weights count once), or hold one of another shape; the
    component and the first such tensor named. Read from the config and the shards' headers only (the model built
    on the meta device), before anything loads: diffusers dropped unused weights with a warning and sampled another
    model with exit status 0 (``num_layers`` 1 -> 0; ``guidance_embeds`` false on a checkpoint with guidance weights),
    or failed copying out of a meta tensor. The one check of every component of every command (``resolve``)."""
    if source.components()[name][0] == "transformers" and not source.family.streams_encoders:
        return  # its library renames the checkpoint's tensors on load (qwenimage.py): no one-to-one names to check
    files = source.weight_files(name)
    folder = source.component_folder(name)
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in [folder / "config.json", *files]
                  if p.is_file())
    if (str(folder), stamp) in _CHECKED:
        return
    model = skeleton(source, name)
    where = f"the {name} of {source.title} ({folder})"
    fix = "download the model again, or restore its config.json"
    shapes = {key: tuple(info["shape"]) for shard in files for key, info in header(shard).items()}
    groups: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append((key, p))
    used = set()
    for group in groups.values():
        stored = [(key, p) for key, p in group if key in shapes]
        if not stored:
            raise TuneQDMError(f"{where} lacks the weight {group[0][0]!r} that its config.json's "
                               f"{type(model).__name__} needs: {fix}")
        used.update(key for key, _ in group)
        for key, p in stored:
            if shapes[key] != tuple(p.shape):
                raise TuneQDMError(f"{where} holds {key!r} of shape {list(shapes[key])}, but its config.json's "
                                   f"{type(model).__name__} needs {list(p.shape)}: {fix}")
    for key, b in model.named_buffers():
        used.add(key)
        if key in shapes and shapes[key] != tuple(b.shape):
            raise TuneQDMError(f"{where} holds {key!r} of shape {list(shapes[key])}, but its config.json's "
                               f"{type(model).__name__} needs {list(b.shape)}: {fix}")
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unused = sorted(k for k in set(shapes) - used if not any(r.search(k) for r in ignored))
    if unused:
        raise TuneQDMError(f"{where} holds {unused[0]!r}, which its config.json's {type(model).__name__} does not "
                           f"use ({len(unused)} such tensors): {fix}")
    _CHECKED.add((str(folder), stamp))


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
