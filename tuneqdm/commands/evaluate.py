"""``tuneqdm evaluate``: a model's DreamBooth metrics on a subject (DINO, CLIP-I, CLIP-T), or with ``metric="fid"``
its PTQ fidelity on the toy world (Frechet distance of image features, and the text score)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneQDMError
from ..files import check_output_folder, check_writable, writes_to
from ..loading import check_base, load_pipeline
from ..loading.options import (loading, quantized_cache_option, revision_option, single_file_config_option,
                               text_encoders_option, variant_option, version)
from ..options import QUIET_HELP, option
from ..progress import quiet_while
from ..results import read_training_json
from ..quant.kernels import DYNAMIC_CHOICES, FLOAT_BITS
from ..sampling import (GUIDANCE_HELP, MAX_SEQUENCE_LENGTH_HELP, check_sampling, sample_on_dynamic_activations,
                        trained_activation_bits)

EVALUATORS = ("toy", "clip-dino")
DINO_ID, CLIP_ID = "facebook/dino-vits16", "openai/clip-vit-base-patch32"
NOT_THE_TOKEN = {"a", "an", "the", "photo", "of"}  # words of an instance prompt that are never its rare token


@dataclass
class EvaluateConfig:
    """The ``tuneqdm evaluate`` settings; each field is its flag."""

    metric: str = option("dreambooth", "dreambooth: subject metrics; fid: Frechet distance of CLIP-like image "
                         "features, one image per toy-world caption (world seed 50000000) vs the renders, and the "
                         "text score", choices=("dreambooth", "fid"))
    fid_images: int = option(1000, "--metric fid: images on each side (default 1000)")
    instance_data_dir: str | None = option(None, "the subject's real photos (--metric dreambooth)")
    adapter: str | None = option(None, "a `tuneqdm train` output folder (default: the base itself)")
    pretrained_model_name_or_path: str | None = option(
        None, "a local diffusers folder or hub id (default: the adapter's base or the embedded pipeline)")
    revision: str | None = revision_option(adapter=True)
    variant: str | None = variant_option(adapter=True)
    single_file_config: str | None = single_file_config_option(adapter=True)
    text_encoders: str = text_encoders_option()
    quantized_cache: str | bool | None = quantized_cache_option()
    quantized_base: str | None = option(
        None, "a quantized base folder (tuneqdm.save_quantized; default: the one the adapter was trained on, if its "
              "folder still exists, else none)")
    prompts: str | None = option(
        None, "dreambooth-object, dreambooth-live, toy or a file of prompts with {0} = token, {1} = class and all "
              "else literal (default: toy for a toy subject, else dreambooth-object)")
    images_per_prompt: int = option(4)
    evaluator: str | None = option(None, "toy: the shipped toy-world encoders; clip-dino: real DINO and CLIP "
                                         "(default: toy on the embedded pipeline, else clip-dino)", choices=EVALUATORS)
    dino_id: str = option(DINO_ID)
    clip_id: str = option(CLIP_ID)
    token: str | None = option(None, "the rare token (default: from the instance prompt)")
    class_word: str | None = option(None, "default: from subject.json or the adapter")
    keep_token_in_clip_t: bool = option(False, "score CLIP-T against the prompt as written")
    num_inference_steps: int = option(25)
    max_sequence_length: int | None = option(None, MAX_SEQUENCE_LENGTH_HELP)
    guidance_scale: float | None = option(None, GUIDANCE_HELP)
    seed: int = option(0, "prompt p, image i uses seed + 1000 p + i")
    device: str = option("cpu")
    activation_bits: int | None = option(None, "sample on 8-bit dynamic activations or 16 (float); default: as the "
                                         "adapter trained, as generate samples it", choices=DYNAMIC_CHOICES)
    out: str = option("evaluation")
    force: bool = option(False, "replace an earlier evaluation in --out")
    quiet: bool = option(False, QUIET_HELP)


@writes_to(lambda config: config.out)
def run_evaluate(config: EvaluateConfig) -> dict:
    """Check every setting before sampling, evaluate, and write ``config.out``; returns the metrics."""
    from ..eval.evaluate import EVALUATION_FILES

    with quiet_while(config.quiet):
        if config.images_per_prompt < 1:
            raise TuneQDMError("--images_per_prompt must be at least 1")
        check_sampling(config.guidance_scale, config.num_inference_steps,
                       max_sequence_length=config.max_sequence_length)
        if config.metric == "fid" and config.max_sequence_length is not None:
            raise TuneQDMError("--metric fid samples the embedded toy pipeline, which has no T5 encoder: drop "
                               "--max_sequence_length")
        if config.metric == "fid" and config.fid_images < 2:
            raise TuneQDMError(f"--fid_images must be at least 2 (a covariance needs two images), got "
                               f"{config.fid_images}")
        out = Path(config.out)
        check_writable(out)  # before any sampling
        check_base(config.pretrained_model_name_or_path, **version(config))  # before the evaluators load
        check_output_folder(out, config.force, EVALUATION_FILES, "an evaluation")
        if config.metric == "fid":
            return _evaluate_fid(config, out)
        return _evaluate_subject(config, out)


def _evaluate_subject(config: EvaluateConfig, out: Path) -> dict:
    from ..eval.evaluate import METRICS, evaluate, read_photos
    from ..eval.prompts import evaluation_prompts
    from ..train.data import subject_metadata

    if config.instance_data_dir is None:
        raise TuneQDMError("--instance_data_dir is required for --metric dreambooth (the subject's photos)")
    real = read_photos(config.instance_data_dir)
    subject = subject_metadata(config.instance_data_dir)
    trained = read_training_json(config.adapter) if config.adapter else {}
    class_word = config.class_word or subject.get("class") or next(iter(trained.get("classes") or []), None)
    if not class_word:
        raise TuneQDMError("no class word: pass --class_word (e.g. dog)")
    token = config.token if config.token is not None else _rare_token(subject, trained, class_word)
    spec = config.prompts or ("toy" if subject.get("prompts") else "dreambooth-object")
    prompts = evaluation_prompts(spec, token, class_word)
    evaluator = config.evaluator or ("toy" if config.pretrained_model_name_or_path is None and (
        not trained or trained.get("base_id") == "tuneqdm-toy-default") else "clip-dino")
    subject_enc, clip_enc = _encoders(evaluator, config)
    pipe = load_pipeline(config.pretrained_model_name_or_path, adapter=config.adapter,
                         quantized_base=config.quantized_base, device=config.device, vae_encoder=False,
                         **version(config), **loading(config))
    info = {"adapter": config.adapter, "base": config.pretrained_model_name_or_path,
            "quantized_base": config.quantized_base, "instance_data_dir": str(config.instance_data_dir),
            "prompts": spec, "evaluator": evaluator, "class_word": class_word, **version(config),
            "activation_bits": _sample_activations(config, pipe)}
    m = evaluate(pipe, real, prompts, config.images_per_prompt, subject_enc, clip_enc, token, out, seed=config.seed,
                 num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                 keep_token=config.keep_token_in_clip_t, info=info, replace=config.force,
                 max_sequence_length=config.max_sequence_length, release_denoiser=True)
    print(f"DINO {m['dino']:.3f}  CLIP-I {m['clip_i']:.3f}  CLIP-T {m['clip_t']:.3f}  "
          f"({len(prompts)} prompts x {config.images_per_prompt} images, {evaluator} evaluators) -> {out / METRICS}")
    return m


def _sample_activations(config: EvaluateConfig, pipe) -> int:
    """Put the pipeline on the activations it is evaluated with (--activation_bits, default: as the adapter trained);
    returns their bits."""
    bits = config.activation_bits or trained_activation_bits(config.adapter)
    if bits != FLOAT_BITS:
        sample_on_dynamic_activations(pipe, bits)
    return bits


def _rare_token(subject: dict, trained: dict, class_word: str) -> str:
    """The word of the instance prompt that is not in the class prompt, e.g. "sks"."""
    from ..train.data import words

    instance = subject.get("instance_prompt") or next(iter(trained.get("instance_prompts") or []), "a sks")
    rare = [w for w in words(instance) if w not in set(words(class_word)) | NOT_THE_TOKEN]
    return rare[0] if rare else "sks"


def _encoders(evaluator: str, config: EvaluateConfig):
    """(subject encoder, CLIP-like encoder): the shipped toy-world ones, or real DINO and CLIP."""
    if evaluator == "toy":
        from ..toy.evaluators import load_toy_clip, load_toy_dino

        return load_toy_dino(), load_toy_clip()
    from ..eval.real import ClipEncoder, DinoEncoder

    return DinoEncoder(config.dino_id, device=config.device), ClipEncoder(config.clip_id, device=config.device)


def _evaluate_fid(config: EvaluateConfig, out: Path) -> dict:
    from ..eval.fid import fid_evaluate

    evaluator = config.evaluator or ("toy" if config.pretrained_model_name_or_path is None else "clip-dino")
    if evaluator == "toy":
        from ..toy.evaluators import load_toy_clip

        encoder = load_toy_clip()
    else:
        from ..eval.real import ClipEncoder

        encoder = ClipEncoder(config.clip_id, device=config.device)
    pipe = load_pipeline(config.pretrained_model_name_or_path, adapter=config.adapter,
                         quantized_base=config.quantized_base, device=config.device, vae_encoder=False,
                         **version(config), **loading(config))
    info = {"adapter": config.adapter, "base": config.pretrained_model_name_or_path,
            "quantized_base": config.quantized_base, **version(config),
            "activation_bits": _sample_activations(config, pipe)}
    m = fid_evaluate(pipe, encoder, out, num_images=config.fid_images, seed=config.seed,
                     num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale, info=info,
                     replace=config.force)
    print(f"FD {m['fd']:.4f}  text score {m['text_score']:.3f} (renders {m['reference_text_score']:.3f})  "
          f"({config.fid_images} images, {encoder.name} features) -> {out / 'metrics.json'}")
    return m
