"""The flags of how a command reads a model (every command that loads one declares these fields on its config):
which files (``revision``, ``variant``, ``single_file_config``), and how (``text_encoders``, ``quantized_cache``).
``adapter``: the command also takes an ``--adapter``, whose recorded values come first."""

from __future__ import annotations

from ..options import option

TEXT_ENCODERS = ("stream", "resident")


def _trained(adapter: bool) -> str:
    return "the adapter's, else " if adapter else ""


def revision_option(adapter: bool = False):
    return option(None, f"a hub id's branch, tag or commit (default: {_trained(adapter)}the repository's main branch)")


def variant_option(adapter: bool = False):
    return option(None, "load the model's files of this variant, e.g. fp16 for *.fp16.safetensors "
                        f"(default: {_trained(adapter)}the files without a variant)")


def single_file_config_option(adapter: bool = False):
    return option(None, "for a single-file checkpoint (--pretrained_model_name_or_path model.safetensors): the "
                        "diffusers pipeline (folder or hub id) its configs, tokenizers and missing components come "
                        f"from (default: {_trained(adapter)}the hub repository diffusers infers from the file)",
                  metavar="FOLDER_OR_ID")


def text_encoders_option(train: bool = False):
    return option(None if train else "stream",
                  "stream: each module's weights read from the files as it runs (the least memory: a T5-XXL is one "
                  "Linear at a time); resident: loaded whole (faster for many prompts) (default: "
                  + ("stream with the memory savers, else resident)" if train else "stream)"), choices=TEXT_ENCODERS)


def quantized_cache_option():
    return option(None, "reuse quantized bases from DIR, and add the ones quantized now (default: $TUNEQDM_CACHE, "
                        "else ~/.cache/tuneqdm)", metavar="DIR",
                  also=[("--no_quantized_cache", dict(action="store_const", const=False,
                                                      help="quantize the base from its files every time, and write "
                                                           "no cache entry"))])


def version(config) -> dict:
    """The files a config names, as ``load_pipeline``'s keyword arguments."""
    return {"revision": config.revision, "variant": config.variant, "single_file_config": config.single_file_config}


def loading(config) -> dict:
    """How a config reads the model, as ``load_pipeline``'s keyword arguments."""
    return {"text_encoders": config.text_encoders, "quantized_cache": config.quantized_cache}
