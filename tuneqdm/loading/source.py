"""A base model as checked local files (made by ``tuneqdm.loading.resolver.resolve``).

A :class:`Source` answers everything the
commands ask before any model is built: which pipeline class and family, where each component's files are, which of
its tensors are in which shard (checked: a missing, truncated or foreign shard is one line here, not half-way
through loading), what the denoiser's content fingerprint is, how the base is recorded in adapters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..families import Family, family_named
from ..errors import TuneQDMError
from ..files import read_json
from ..shards import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, content_fingerprint, weight_files

DEFAULT_BASE_ID = "tuneqdm-toy-default"  # the base id recorded for the embedded default pipeline
LIBRARY_WEIGHTS = {"diffusers": DIFFUSERS_WEIGHTS, "transformers": TRANSFORMERS_WEIGHTS}


@dataclass
class Source:
    """A resolved base model: ``folder`` holds its ``model_index.json`` and one subfolder per component."""

    name: str | None  # as the user gave it (None: the embedded pipeline)
    folder: Path
    revision: str | None = None
    variant: str | None = None
    index: dict = field(default_factory=dict)  # model_index.json
    folders: dict = field(default_factory=dict)  # {component: its folder} where not folder/component (single files)
    _files: dict = field(default_factory=dict, repr=False)
    _fingerprints: dict = field(default_factory=dict, repr=False)

    @property
    def pipeline_class(self) -> str:
        return str(self.index.get("_class_name"))

    @property
    def family(self) -> Family:
        return family_named(self.pipeline_class)

    @property
    def denoiser(self) -> str:
        """The denoiser's component name: ``unet`` or ``transformer``."""
        return self.family.attribute

    @property
    def base_id(self) -> str:
        return base_id(self.name)

    @property
    def title(self) -> str:
        """How messages name it."""
        return "the embedded toy pipeline" if self.name is None else self.name

    def components(self) -> dict[str, tuple[str, str]]:
        """``{component: (library, class name)}`` of the pipeline's index, the ones it leaves empty left out."""
        return {name: (spec[0], spec[1]) for name, spec in self.index.items()
                if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[0] and spec[1]}

    def component_folder(self, name: str) -> Path:
        return self.folders.get(name, self.folder / name)

    def variant_of(self, name: str) -> str | None:
        """The variant of a component's files (a single file's converted components have none)."""
        return None if name in self.folders else self.variant

    def config(self, name: str) -> dict:
        """A component's ``config.json`` (diffusers models and schedulers: ``scheduler_config.json``)."""
        folder = self.component_folder(name)
        path = folder / "config.json"
        if not path.is_file() and (folder / "scheduler_config.json").is_file():
            path = folder / "scheduler_config.json"
        return read_json(path, f"{name} configuration")

    def weight_files(self, name: str) -> dict[Path, list[str]]:
        """``{shard: [tensor names]}`` of a model component, checked (see ``tuneqdm.shards.weight_files``)."""
        if name not in self._files:
            library = self.components().get(name, ("diffusers", ""))[0]
            self._files[name] = weight_files(self.component_folder(name), self.variant_of(name),
                                             LIBRARY_WEIGHTS.get(library, DIFFUSERS_WEIGHTS))
        return self._files[name]

    def fingerprint(self, name: str) -> str:
        """A component's content fingerprint (``tuneqdm.shards.content_fingerprint``)."""
        if name not in self._fingerprints:
            self._fingerprints[name] = content_fingerprint(self.weight_files(name))
        return self._fingerprints[name]

    def model_components(self) -> list[str]:
        """The components that are models with weight files (denoiser, VAE, text encoders, ...)."""
        return [name for name in self.components() if self.has_weights(name)]

    def used_components(self) -> list[str]:
        """The model components a text-to-image call runs (denoiser, VAE, text encoders), which tuneqdm builds; the
        others (a safety checker, an image encoder) are left out of every pipeline it assembles."""
        return [name for name in self.model_components()
                if name in (self.denoiser, "vae") or name.startswith("text_encoder")]

    def has_weights(self, name: str) -> bool:
        folder = self.component_folder(name)
        return folder.is_dir() and any(folder.glob("*.safetensors*"))

    def check(self) -> Source:
        """The pipeline class is supported and the shards of every model it runs are whole: one line otherwise."""
        self.family  # noqa: B018 -- one line naming the supported classes for another pipeline
        for name in self.used_components():  # not a safety checker: never loaded (and named as transformers names)
            self.weight_files(name)
        for name, (library, cls) in self.components().items():
            if library == "transformers" and "Tokenizer" in cls:
                self._check_tokenizer(name)
        if self.denoiser not in self.components():  # a model_index.json entry deleted or of another shape
            raise TuneQDMError(f"{self.folder / 'model_index.json'} names no {self.denoiser} component (the "
                               f"denoiser of a {self.pipeline_class}, as [library, class]): download the model again, "
                               "or restore its model_index.json")
        for name in self.components():
            self._check_sizes(name)
        if not self.has_weights(self.denoiser):
            raise TuneQDMError(f"{self.folder / self.denoiser} holds no safetensors weights: pass a diffusers "
                               "pipeline saved with safetensors (e.g. save_pretrained(..., safe_serialization=True))")
        return self


    def _check_sizes(self, name: str) -> None:
        """A model's or scheduler's size and count settings are positive integers: a scheduler of 0 training
        timesteps or a VAE of sample size 0 ended in tracebacks (or a size of 0 pixels) far from the file."""
        folder = self.component_folder(name)
        if not any((folder / f).is_file() for f in ("config.json", "scheduler_config.json")):
            return  # tokenizers (and components diffusers reports itself)
        config = self.config(name)
        for key in SIZE_SETTINGS:
            value = config.get(key) if isinstance(config, dict) else None
            values = value if isinstance(value, list) else [value]
            if value is not None and not (values and all(type(v) is int and v >= 1 for v in values)):
                raise TuneQDMError(f"the {name} configuration of {self.title} sets {key} to {json.dumps(value)}, "
                                   f"which must be a positive integer: download the model again, or restore its "
                                   "config")

    def _check_tokenizer(self, name: str) -> None:
        """A tokenizer the index names has its vocabulary: without one, transformers builds an empty tokenizer and
        every prompt is silently dropped (or the pipeline fails at its first prompt)."""
        folder = self.component_folder(name)
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise TuneQDMError(f"the pipeline {self.title} lacks the vocabulary of its {name} ({folder} holds none of "
                               f"{', '.join(TOKENIZER_FILES[:3])}, ...): without it every prompt would be dropped; "
                               "download or save the pipeline again")


SIZE_SETTINGS = ("num_train_timesteps", "sample_size")  # of a scheduler, of a model (a list: height and width)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "vocab.txt",
                   "sentencepiece.bpe.model")  # a vocabulary, in any of the formats transformers reads


def base_id(base: str | Path | None) -> str:
    """How a base is recorded in adapters: the embedded default by name, a local folder by absolute path, a hub id
    as given."""
    if base is None:
        return DEFAULT_BASE_ID
    path = Path(base)
    return str(path.resolve()) if path.exists() else str(base)


def read_base_id(quantized_base) -> str | None:
    """The base id a quantized base folder records (None when it cannot be read: loading reports why)."""
    try:
        recorded = json.loads((Path(quantized_base) / "quantization.json").read_text()).get("base_id")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def base_from_id(base_id: str | None) -> str | None:
    """The ``--pretrained_model_name_or_path`` an adapter's recorded base id stands for (None: the embedded one)."""
    return None if not isinstance(base_id, str) or base_id == DEFAULT_BASE_ID else base_id
