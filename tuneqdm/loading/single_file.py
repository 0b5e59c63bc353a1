"""Single-file checkpoints: one ``model.safetensors`` in the original layout (as civitai and ComfyUI ship SD 1.x/2.x,
SDXL and FLUX.1) read through the same loading path as a diffusers folder.

Which tensor of the file becomes which diffusers tensor is diffusers' knowledge: its ``from_single_file`` converters
(``SINGLE_FILE_LOADABLE_CLASSES[cls]["checkpoint_mapping_fn"]``, the CLIP and T5 ones). They are run once on *lazy*
tensors: meta tensors that remember how they were made (a tensor of the file, or an op on lazy tensors: diffusers
renames, slices, chunks, concatenates and transposes), so working out the mapping reads no weight. Each component
found in the file is then written once, shard by shard, as an ordinary diffusers component folder under the cache
(``$TUNEQDM_CACHE/single-file/<key>``, keyed by the file's content fingerprint, the configs and the diffusers
version; written whole or not at all), and every command reads it like any folder: streamed quantization, the
cache of quantized bases, streamed encoders. Components the file lacks (a FLUX.1 transformer-only file's encoders
and VAE) are read from the config pipeline's own files.

The configs (``model_index.json``, each component's config, tokenizers, scheduler) come from
``--single_file_config`` (a diffusers pipeline folder or hub id), else, as in ``from_single_file``, from the hub
repository diffusers infers from the file's tensors (configs only; weights only for the components the file lacks).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import TuneQDMError, TuneQDMWarning
from ..files import atomic_dir, first_line, read_json
from ..progress import progress
from ..shards import FLOAT_DTYPES, INDEX_SUFFIX, OTHER_DTYPES, content_fingerprint, header, read_tensor
from .source import LIBRARY_WEIGHTS, Source

CONVERSION_VERSION = 1  # raised whenever what this module writes for a file changes
SHARD_BYTES = 2**28  # the converted components' shards: the most the conversion holds at once
_DTYPES = {**FLOAT_DTYPES, **OTHER_DTYPES}


class LazyTensor(torch.Tensor):
    """A meta tensor that remembers its recipe: ``("file", key)`` or ``(step, index)`` where ``step`` is the torch
    call that made it (``index``: which of its outputs; None when it has one)."""

    recipe: tuple

    @staticmethod
    def __new__(cls, meta: torch.Tensor, recipe: tuple):
        t = torch.Tensor._make_subclass(cls, meta, False)
        t.recipe = recipe
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        step = (func, args, kwargs)
        if isinstance(out, LazyTensor):
            out.recipe = (step, None)
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, LazyTensor):
                    t.recipe = (step, i)
        return out


def lazy_checkpoint(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a (checked) safetensors file as a lazy tensor of its stored dtype and shape."""
    out = {}
    for key, info in header(path).items():
        if info["dtype"] not in _DTYPES:
            raise TuneQDMError(f"{path}: tensor {key!r} is stored as {info['dtype']}, which tuneqdm does not read "
                               f"(it reads {', '.join(_DTYPES)}): save the checkpoint in one of those")
        meta = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")
        out[key] = LazyTensor(meta, ("file", key))
    return out


class _Materializer:
    """Replays recipes on the file's tensors; the last step's outputs are kept (q, k and v chunked from one fused
    tensor read it once)."""

    def __init__(self, path: Path):
        self.path, self.last = path, (None, None)

    def __call__(self, t) -> torch.Tensor:
        if not isinstance(t, LazyTensor):
            return t.detach() if isinstance(t, torch.Tensor) else t
        where, index = t.recipe
        if where == "file":
            return read_tensor(self.path, index, float_only=False)
        if self.last[0] is not where:
            func, args, kwargs = where
            with torch.no_grad():
                self.last = (where, func(*self._real(args), **self._real(kwargs)))
        out = self.last[1]
        return out if index is None else out[index]

    def _real(self, x):
        if isinstance(x, torch.Tensor):
            return self(x)
        if isinstance(x, (list, tuple)):  # torch.Size too
            return type(x)([self._real(v) for v in x])
        if isinstance(x, dict):
            return {k: self._real(v) for k, v in x.items()}
        return x


# ---- what diffusers' converters make of a file, per component ----------------------------------------------------
def _convert_clip(cls, checkpoint: dict, skeleton) -> dict:
    """diffusers' choice of CLIP converter (``create_diffusers_clip_model_from_ldm``) without building the model."""
    from diffusers.loaders import single_file_utils as sf

    text_model = getattr(skeleton, "text_model", skeleton)
    width = text_model.embeddings.position_embedding.weight.shape[-1]
    names = sf.CHECKPOINT_KEY_NAMES
    if sf.is_clip_model(checkpoint):
        out = sf.convert_ldm_clip_checkpoint(checkpoint)
    elif sf.is_clip_sdxl_model(checkpoint) and checkpoint[names["clip_sdxl"]].shape[-1] == width:
        out = sf.convert_ldm_clip_checkpoint(checkpoint)
    elif sf.is_open_clip_model(checkpoint):
        out = sf.convert_open_clip_checkpoint(skeleton, checkpoint, prefix="cond_stage_model.model.")
    elif sf.is_open_clip_sdxl_model(checkpoint) and checkpoint[names["open_clip_sdxl"]].shape[-1] == width:
        out = sf.convert_open_clip_checkpoint(skeleton, checkpoint, prefix="conditioner.embedders.1.model.")
    elif sf.is_open_clip_sdxl_refiner_model(checkpoint):
        out = sf.convert_open_clip_checkpoint(skeleton, checkpoint, prefix="conditioner.embedders.0.model.")
    else:
        return {}
    if not hasattr(skeleton, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return out


def convert_component(library: str, class_name: str, checkpoint: dict, skeleton, config: dict) -> dict:
    """diffusers' conversion of one component of ``checkpoint`` (lazy tensors), by the component's class; an empty
    dict when diffusers finds none of it in the file."""
    from diffusers.loaders import single_file_utils as sf

    checkpoint = dict(checkpoint)  # some converters pop what they take
    try:
        if library == "diffusers":
            from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

            mapping = SINGLE_FILE_LOADABLE_CLASSES.get(class_name)
            return {} if mapping is None else mapping["checkpoint_mapping_fn"](checkpoint=checkpoint, config=config)
        if class_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            return _convert_clip(type(skeleton), checkpoint, skeleton)
        if sf.is_t5_in_single_file(checkpoint):
            return sf.convert_sd3_t5_checkpoint_to_diffusers(checkpoint)
    except (KeyError, IndexError, ValueError, RuntimeError, TypeError, AttributeError):
        return {}  # the converter met a file without this component (its tensors checked below when it has it)
    return {}


def _leaves(t, out: set) -> set:
    """The file's tensor names a lazy tensor is made from."""
    if isinstance(t, LazyTensor):
        where, index = t.recipe
        if where == "file":
            out.add(index)
        else:
            _leaves(where[1], out)
            _leaves(where[2], out)
    elif isinstance(t, (list, tuple)):
        for v in t:
            _leaves(v, out)
    elif isinstance(t, dict):
        for v in t.values():
            _leaves(v, out)
    return out


def _expected(skeleton) -> dict[str, torch.Tensor]:
    """The tensors a component's files must hold: its state dict, tied parameters once."""
    seen, out = set(), {}
    for name, t in skeleton.state_dict(keep_vars=True).items():
        if id(t) not in seen or not isinstance(t, torch.nn.Parameter):
            out[name] = t
        seen.add(id(t))
    return out


def _take(path: Path, name: str, converted: dict, skeleton) -> dict | None:
    """The converted tensors the component needs (None: the file holds none of it); one line when the file holds
    only part of it, or a tensor of the wrong shape."""
    expected = _expected(skeleton)
    found = {k: v for k, v in converted.items() if k in expected}
    if not found:
        return None
    buffers = dict(skeleton.named_buffers())
    missing = [k for k in expected if k not in found and k not in buffers]
    if missing:
        raise TuneQDMError(f"{path} holds part of a {type(skeleton).__name__} for {name}, without {missing[0]!r} "
                           f"({len(missing)} tensors missing): it is not a checkpoint of this pipeline's config (pass "
                           "--single_file_config with the diffusers pipeline the file was made from)")
    for k, v in found.items():
        if expected[k].is_floating_point() and not v.is_floating_point():
            raise TuneQDMError(f"{path}: its {name} tensor {k!r} is stored as {v.dtype}, not as a float weight: pass a "
                               "checkpoint stored in fp32, fp16, bf16 or fp8")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise TuneQDMError(f"{path}: its {name} tensor {k!r} has shape {tuple(v.shape)}, the config implies "
                               f"{tuple(expected[k].shape)}: pass --single_file_config with the diffusers pipeline "
                               "the file was made from")
    return found


def _write(path: Path, folder: Path, library: str, tensors: dict, bar) -> None:
    """The component's converted tensors as shards of at most SHARD_BYTES, each made and written before the next."""
    from safetensors.torch import save_file

    weights = LIBRARY_WEIGHTS[library]
    stem, ext = weights.rsplit(".", 1)
    plan, current, size = [], [], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            plan.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        plan.append(current)
    make, weight_map = _Materializer(path), {}
    for i, keys in enumerate(plan):
        file = weights if len(plan) == 1 else f"{stem}-{i + 1:05d}-of-{len(plan):05d}.{ext}"
        shard = {}
        for key in keys:
            t = make(tensors[key])
            shard[key] = t.contiguous().clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() \
                or t._base is not None else t.contiguous()
            bar.update(t.numel() * t.element_size())
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
        del shard
    if len(plan) > 1:
        (folder / (weights + INDEX_SUFFIX)).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---- the single file as a Source ---------------------------------------------------------------------------------
def single_file_source(path: Path, config: str | None, variant: str | None = None) -> Source:
    """The :class:`Source` of a single-file checkpoint: the config pipeline's configs, each component the file holds
    converted once into the cache (see the module docstring)."""
    from .cache import default_cache_dir
    from .components import skeleton

    path = Path(path).resolve()
    checkpoint = lazy_checkpoint(path)
    config_folder, repo = _config_folder(path, checkpoint, config)
    index = read_json(config_folder / "model_index.json", "diffusers pipeline")
    base = Source(str(path), config_folder, None, variant, index)
    base.family  # noqa: B018 -- an unsupported pipeline is one line before any conversion
    parts, configs = {}, {}
    for name, (library, class_name) in base.components().items():
        if library not in LIBRARY_WEIGHTS or not (config_folder / name / "config.json").is_file():
            continue  # tokenizers, schedulers
        model = skeleton(base, name)
        configs[name] = base.config(name)
        found = _take(path, name, convert_component(library, class_name, checkpoint, model, configs[name]), model)
        if found is not None:
            parts[name] = (library, found)
    if base.denoiser not in parts:
        raise TuneQDMError(f"{path} holds no {base.pipeline_class} {base.denoiser} that diffusers can read: pass a "
                           "single file of SD 1.x/2.x, SDXL or FLUX.1 (and --single_file_config with its diffusers "
                           "pipeline when the file is of another one)")
    key = hashlib.sha256(json.dumps({"file": content_fingerprint({path: list(checkpoint)}), "configs": configs,
                                     "parts": sorted(parts), "version": CONVERSION_VERSION,
                                     "diffusers": _diffusers_version()}, sort_keys=True, default=str).encode())
    entry = default_cache_dir() / "single-file" / key.hexdigest()[:24]
    if not all((entry / name / "config.json").is_file() for name in parts):
        _convert(path, entry, config_folder, parts)
    taken = _leaves([tensors for _, tensors in parts.values()], set())
    unused = [k for k, t in checkpoint.items() if k not in taken and t.dim() >= 2 and not k.startswith("model_ema.")]
    elsewhere = [name for name in configs if name not in parts]
    if unused and elsewhere:  # e.g. a component diffusers could not convert: say where it comes from instead
        warnings.warn(f"{path.name} holds {len(unused)} weights no component took (e.g. {unused[0]}); its "
                      f"{', '.join(elsewhere)} come{'s' if len(elsewhere) == 1 else ''} from {config_folder}",
                      TuneQDMWarning, stacklevel=2)
    lacking = [name for name in elsewhere if not base.has_weights(name)]
    if lacking and repo is not None:  # as from_single_file: the components the file lacks, from the repository
        _download(path, repo, [f"{name}/*" for name in lacking])
        lacking = [name for name in lacking if not base.has_weights(name)]
    if lacking:
        raise TuneQDMError(f"{path} holds no {lacking[0]}, and {config_folder} has no weights for it: pass "
                           "--single_file_config with a diffusers pipeline folder that has them")
    source = Source(str(path), config_folder, None, variant, index,
                    folders={name: entry / name for name in parts})
    return source.check()


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _convert(path: Path, entry: Path, config_folder: Path, parts: dict) -> None:
    """Write every converted component under ``entry`` (whole or not at all), with a bar of bytes written."""
    total = sum(t.numel() * t.element_size() for _, tensors in parts.values() for t in tensors.values())
    existing = entry.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < total + 2**28:
        raise TuneQDMError(f"converting {path.name} needs about {total / 2**30:.2f} GiB in {entry.parent} and its disk "
                           f"has {free / 2**30:.2f} GiB free: free space or set $TUNEQDM_CACHE to another disk")
    bar = progress(desc=f"converting {path.name} to diffusers' layout ({', '.join(parts)})", total=total, unit="B",
                   unit_scale=True, unit_divisor=1024, mininterval=1.0)
    try:
        with bar, atomic_dir(entry) as tmp:
            for name, (library, tensors) in parts.items():
                (tmp / name).mkdir()
                shutil.copy(config_folder / name / "config.json", tmp / name / "config.json")
                _write(path, tmp / name, library, tensors, bar)
    except OSError as e:
        raise TuneQDMError(f"cannot write the converted {path.name} to {entry} ({first_line(e)}); nothing partial was "
                           "left: free space or set $TUNEQDM_CACHE to another disk") from None


def _config_folder(path: Path, checkpoint: dict, config: str | None) -> tuple[Path, str | None]:
    """The pipeline folder the configs come from and, when it is a hub snapshot, its repository: ``config`` (a folder
    or hub id), else the hub repository diffusers infers from the tensors' names and shapes (configs only)."""
    if config is not None and Path(config).is_dir():
        if not (Path(config) / "model_index.json").is_file():
            raise TuneQDMError(f"--single_file_config {config} has no model_index.json: pass a diffusers pipeline "
                               "folder or hub id")
        return Path(config), None
    if config is None:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        try:
            config = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
        except (KeyError, IndexError, ValueError, TypeError, AttributeError):
            raise TuneQDMError(f"cannot tell which pipeline {path} is from its tensors: pass --single_file_config "
                               "with its diffusers pipeline folder or hub id") from None
    return _download(path, config, CONFIG_FILES), config


CONFIG_FILES = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]


def _download(path: Path, repo: str, patterns: list[str]) -> Path:
    """The files of ``repo`` that match ``patterns``, in the local hub cache (fetched where missing)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 -- offline, unknown repository, gated: all one line
        raise TuneQDMError(f"cannot fetch {repo}'s files for {path.name} ({first_line(e, None)}): pass "
                           "--single_file_config with a local diffusers pipeline folder of the same model") from None
