"""What the user named as a model (``--pretrained_model_name_or_path``), resolved once to a checked
:class:`~tuneqdm.loading.source.Source`: the embedded toy pipeline, a local diffusers folder, a hub id (downloaded by
diffusers into its cache, then read like a folder) or a single-file checkpoint (``tuneqdm.loading.single_file``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import TuneQDMError
from ..files import first_line, read_json
from .components import check_config, check_weights
from .single_file import single_file_source
from .source import Source


def resolve(base: str | Path | None, revision: str | None = None, variant: str | None = None,
            single_file_config: str | None = None) -> Source:
    """The checked :class:`Source` of what ``--pretrained_model_name_or_path`` names (None: the embedded pipeline),
    at ``revision`` (a hub id's branch, tag or commit) and in ``variant`` (``*.fp16.safetensors``); a single-file
    checkpoint with the configs of ``single_file_config`` (``tuneqdm.loading.single_file``)."""
    if single_file_config is not None and not (base is not None and Path(base).is_file()):
        raise TuneQDMError("--single_file_config gives the configs of a single-file checkpoint, but "
                           f"{base or 'the embedded pipeline'} is not one: drop --single_file_config")
    if base is None:
        if revision is not None or variant is not None:
            raise TuneQDMError("--revision and --variant apply to the model of --pretrained_model_name_or_path; the "
                               "embedded pipeline has one version: drop them or name the model")
        from ..toy.pipeline import DEFAULT_PIPELINE_DIR, check_pipeline_folder  # on use: toy/ loads PIL

        check_pipeline_folder(DEFAULT_PIPELINE_DIR)
        folder = DEFAULT_PIPELINE_DIR
    elif Path(base).exists():
        if revision is not None:
            raise TuneQDMError(f"--revision {revision} names a version of a hub repository, but {base} is a local "
                               "folder: drop --revision (the folder holds one version)")
        folder = Path(base)
        if folder.is_file():
            if folder.suffix != ".safetensors":
                raise TuneQDMError(f"{base} is not a .safetensors file: pass a single-file checkpoint saved with "
                                   "safetensors (.ckpt files are pickles, which can run code), a diffusers pipeline "
                                   "folder or a hub id")
            if revision is not None:
                raise TuneQDMError(f"--revision {revision} names a version of a hub repository, but {base} is a "
                                   "local file: drop --revision")
            return single_file_source(folder, single_file_config, variant)
    elif _looks_local(str(base)):
        raise TuneQDMError(f"cannot load the pipeline {base}: no such folder (check --pretrained_model_name_or_path)")
    else:
        folder = _download(str(base), revision, variant)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise TuneQDMError(f"cannot tell which pipeline {base} is (no model_index.json in {folder}): pass a "
                           "diffusers pipeline folder or hub id")
    source = Source(None if base is None else str(base), folder, revision, variant,
                    read_json(index_file, "diffusers pipeline")).check()
    for name in source.components():
        check_config(source, name)
    for name in source.used_components():
        check_weights(source, name)
    return source


def _looks_local(name: str) -> bool:
    """A name that can only be a path (a hub id is ``name`` or ``namespace/name``)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _download(repo: str, revision: str | None, variant: str | None) -> Path:
    """A hub pipeline's files in the local hub cache (fetched by diffusers where missing), as a folder."""
    from diffusers import DiffusionPipeline

    from ..libraries import quiet_loading

    quiet_loading()
    try:
        return Path(DiffusionPipeline.download(repo, revision=revision, variant=variant))
    except (OSError, ValueError) as e:
        raise TuneQDMError(f"cannot load the pipeline {repo}: {first_line(e, None)} (check "
                           "--pretrained_model_name_or_path, and --variant for a folder saved in one)") from None
