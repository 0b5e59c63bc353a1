"""From a model's files to a ready pipeline: one loading path for every command (see ``tuneqdm.loading.source``,
``.components``, ``.streamed``, ``.denoiser``, ``.cache``, ``.pipeline`` and ``.adapters``)."""

from .adapters import add_lora_file, check_lora_scale, load_pipeline
from .cache import QuantizedCache
from .denoiser import denoiser_skeleton, float_denoiser, quantized_denoiser
from .pipeline import assemble, check_base, float_fingerprint, pipeline_fingerprint, pipeline_from
from .resolver import resolve
from .source import DEFAULT_BASE_ID, Source, base_id

__all__ = ["DEFAULT_BASE_ID", "QuantizedCache", "Source", "add_lora_file", "assemble", "base_id", "check_base",
           "check_lora_scale", "denoiser_skeleton", "float_denoiser", "float_fingerprint", "load_pipeline",
           "pipeline_fingerprint", "pipeline_from", "quantized_denoiser", "resolve"]
