"""The embedded default model: a tiny Stable Diffusion pipeline pretrained on the toy world, shipped in the package.

Every CLI command uses it when no model is named. Its folder is a plain diffusers ``StableDiffusionPipeline`` (fp16
weights, upcast on load) plus ``tuneqdm_pretrain.json``: the recipe, the training length and a SHA-256 per file, so
that a damaged install is reported in one line instead of failing deep inside diffusers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import TuneQDMError
from ..libraries import dtype_kwarg, quiet_loading

DEFAULT_PIPELINE_DIR = Path(__file__).resolve().parent / "default_pipeline"
MANIFEST = "tuneqdm_pretrain.json"
REINSTALL = "reinstall tuneqdm (pip install --force-reinstall tuneqdm)"


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the manifest, by relative path."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def check_pipeline_folder(folder: Path) -> dict:
    """The folder's manifest, after checking every listed file's digest."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError):
        raise TuneQDMError(f"the default pipeline in {folder} is missing or incomplete: {REINSTALL}") from None
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise TuneQDMError(f"the default pipeline file {name} is missing: {REINSTALL}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise TuneQDMError(f"the default pipeline file {name} is corrupted: {REINSTALL}")
    return manifest


def unet_training_steps(manifest: dict) -> int:
    """UNet steps behind a pipeline: its own plus those of the pipelines it was refined from."""
    return int(manifest.get("unet_steps", 0)) + (unet_training_steps(manifest["refined_from"])
                                                 if "refined_from" in manifest else 0)


def default_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: Path | None = None):
    """The embedded ``StableDiffusionPipeline`` (float32 on CPU by default), loaded offline."""
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else DEFAULT_PIPELINE_DIR
    check_pipeline_folder(folder)
    quiet_loading()
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **dtype_kwarg(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
