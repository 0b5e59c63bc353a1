"""The ``tuneqdm`` command. Every user-facing failure is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from .families import denoiser, family, guidance_defaults
from .errors import TrainWarning, TuneQDMError, TuneQDMWarning, either
from .files import (atomic_dir, check_output_folder, check_prompt, check_writable, check_writable_file,
                    output_lock)
from .progress import is_quiet, progress, set_quiet
from .ptq.config import ACTIVATION_BITS, ATTENTION_MODES, DYNAMIC_BITS, GROUP_CHOICES, ActivationConfig
from .quant.kernels import FLOAT_BITS
from .quant.packing import SUPPORTED_BITS
from .quant.paths import kernel_report
from .quant.quantizer import INITS
from .results import read_training_json
from .loading import check_base, load_pipeline, pipeline_fingerprint, resolve
from .sampling import check_sampling, generate, set_scheduler


def _demo(args) -> None:
    from .demo import DEMO_FILES, run_demo

    out = check_output_folder(args.out, args.force, DEMO_FILES, "a demo")
    print(json.dumps(run_demo(out, steps=args.steps, bits=args.bits, seed=args.seed), indent=2))


GENERATED = ("[0-9][0-9][0-9]*.png", "generate.json")  # what `tuneqdm generate` writes into --out


def _generate(args) -> None:
    out = check_output_folder(args.out, args.force, GENERATED, "generated images")
    if args.num_images < 1:
        raise TuneQDMError("--num_images must be at least 1")
    check_prompt(args.prompt, "--prompt")
    check_prompt(args.negative_prompt, "--negative_prompt")
    check_sampling(args.guidance_scale, args.num_inference_steps, args.height, args.width, args.max_sequence_length)
    if args.lora is None and args.lora_scale is not None:
        raise TuneQDMError("--lora_scale weights a --lora file: add --lora FILE, or drop --lora_scale")
    if args.lora is not None and args.lora_scale is None:
        args.lora_scale = 1.0
    if args.lora is not None and args.activation_bits not in (None, FLOAT_BITS):
        raise TuneQDMError("--lora with --activation_bits is not supported: the activation quantizers are calibrated "
                           "for the layers without LoRA")
    if args.activation_quant == "dynamic" and args.activation_bits not in (None, DYNAMIC_BITS):
        raise TuneQDMError(f"--activation_quant dynamic is {DYNAMIC_BITS}-bit: "
                           f"drop --activation_bits {args.activation_bits}")
    _trained_activations(args)
    if args.activation_bits not in (None, FLOAT_BITS):
        ActivationConfig(bits=args.activation_bits, groups=args.groups, attention=args.attention_quant)
    prompt = args.prompt
    if "<class>" in prompt:  # the adapter's class, as in `tuneqdm train --instance_prompt "a sks <class>"`
        classes = {c for c in read_training_json(args.adapter).get("classes") or [] if c} if args.adapter else set()
        if len(classes) != 1:
            raise TuneQDMError("the prompt has a <class> placeholder but no --adapter trained on one toy subject "
                               "names the class: write the class word instead")
        prompt = prompt.replace("<class>", classes.pop())
    pipe = load_pipeline(args.pretrained_model_name_or_path, adapter=args.adapter,
                         quantized_base=args.quantized_base, device=args.device, lora=args.lora,
                         lora_scale=1.0 if args.lora_scale is None else args.lora_scale, kernels=args.kernels,
                         height=args.height, width=args.width, vae_encoder=False, **_version(args), **_loading(args))
    scheduler = set_scheduler(pipe, args.scheduler)
    model, quantizer = denoiser(pipe), _install_activations(args, pipe)
    images = generate(pipe, prompt, args.num_images, args.num_inference_steps, args.guidance_scale, args.seed,
                      negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      max_sequence_length=args.max_sequence_length, release_denoiser=True)
    if quantizer is not None and quantizer.skipped_attention:
        skipped = sorted(quantizer.skipped_attention)
        print(f"tuneqdm: warning: attention left in full precision in {len(skipped)} layers whose processors compute "
              f"no scaled_dot_product_attention (e.g. {skipped[0]})", file=sys.stderr)
    _report_kernels(model, args.kernels)
    with atomic_dir(out) as tmp:
        for i, image in enumerate(images):
            image.save(tmp / f"{i:03d}.png")
        meta = {k: getattr(args, k) for k in ("prompt", "negative_prompt", "num_images", "num_inference_steps",
                                              "guidance_scale", "scheduler", "seed", "pretrained_model_name_or_path",
                                              "revision", "variant", "single_file_config", "adapter", "quantized_base",
                                              "activation_bits",
                                              "groups", "attention_quant", "activations", "activation_quant", "kernels",
                                              "lora", "lora_scale", "max_sequence_length")}
        meta["prompt"] = prompt
        meta["guidance_scale"] = family(pipe).guidance if args.guidance_scale is None else args.guidance_scale
        meta["scheduler"] = scheduler
        meta["height"], meta["width"] = images[0].height, images[0].width
        meta["seeds"] = [args.seed + i for i in range(len(images))]
        (tmp / "generate.json").write_text(json.dumps(meta, indent=1))
    print(f"{len(images)} images of '{prompt}' in {out}")


def _trained_activations(args) -> None:
    """Without --activation_bits, an adapter trained with ``--activation_bits 8`` samples as it trained: dynamic int8
    activations (the integer path); ``--activation_bits 16`` keeps activations in float."""
    if args.activation_bits is None and args.adapter is not None and args.activation_quant == "dgq":
        trained = read_training_json(args.adapter).get("activation_bits")
        if trained == DYNAMIC_BITS:
            args.activation_bits, args.activation_quant = DYNAMIC_BITS, "dynamic"


def _install_activations(args, pipe):
    """generate's activation quantization on the pipeline's denoiser: dynamic int8, or DGQ (calibrated parameters,
    on top of any adapter; returned, for its report of attention it could not quantize), or none."""
    model, kind = denoiser(pipe), family(pipe)
    if args.activation_quant == "dynamic":
        from .ptq.activations import DynamicActivations

        DynamicActivations(args.activation_bits or DYNAMIC_BITS, exclude=kind.first_last).install(model)
    elif args.activation_bits not in (None, FLOAT_BITS):
        from .ptq.activation_calibration import activations_for

        return activations_for(
            pipe, args.activation_bits, args.groups, args.attention_quant, args.activations, args.quantized_base,
            args.calib_prompts, args.calib_samples, args.pretrained_model_name_or_path, args.num_inference_steps,
            args.guidance_scale, log=lambda m: is_quiet() or print(m, file=sys.stderr),
            max_sequence_length=args.max_sequence_length, size=(args.height, args.width)).install(model, kind)
    return None


def _report_kernels(unet, mode: str) -> None:
    counts = kernel_report(unet)
    if any(counts.values()) and not is_quiet():
        print(f"kernels {mode}: " + ", ".join(f"{n} layers {path}" for path, n in counts.items()), file=sys.stderr)


def _evaluate(args) -> None:
    from .eval.evaluate import EVALUATION_FILES, METRICS, evaluate, read_photos
    from .eval.prompts import evaluation_prompts
    from .train.data import subject_metadata, words

    if args.images_per_prompt < 1:
        raise TuneQDMError("--images_per_prompt must be at least 1")
    check_sampling(args.guidance_scale, args.num_inference_steps, max_sequence_length=args.max_sequence_length)
    if args.metric == "fid" and args.max_sequence_length is not None:
        raise TuneQDMError("--metric fid samples the embedded toy pipeline, which has no T5 encoder: drop "
                           "--max_sequence_length")
    if args.metric == "fid" and args.fid_images < 2:
        raise TuneQDMError(f"--fid_images must be at least 2 (a covariance needs two images), got {args.fid_images}")
    out = Path(args.out)
    check_writable(out)  # before any sampling
    check_base(args.pretrained_model_name_or_path, **_version(args))  # before the evaluators load
    check_output_folder(out, args.force, EVALUATION_FILES, "an evaluation")
    if args.metric == "fid":
        return _evaluate_fid(args, out)
    if args.instance_data_dir is None:
        raise TuneQDMError("--instance_data_dir is required for --metric dreambooth (the subject's photos)")
    real = read_photos(args.instance_data_dir)
    subject = subject_metadata(args.instance_data_dir)
    trained = read_training_json(args.adapter) if args.adapter else {}
    class_word = args.class_word or subject.get("class") or next(iter(trained.get("classes") or []), None)
    if not class_word:
        raise TuneQDMError("no class word: pass --class_word (e.g. dog)")
    token = args.token
    if token is None:  # the word of the instance prompt that is not in the class prompt, e.g. "sks"
        instance = subject.get("instance_prompt") or next(iter(trained.get("instance_prompts") or []), "a sks")
        rare = [w for w in words(instance) if w not in set(words(class_word)) | {"a", "an", "the", "photo", "of"}]
        token = rare[0] if rare else "sks"
    spec = args.prompts or ("toy" if subject.get("prompts") else "dreambooth-object")
    prompts = evaluation_prompts(spec, token, class_word)
    evaluator = args.evaluator or ("toy" if args.pretrained_model_name_or_path is None and (
        not trained or trained.get("base_id") == "tuneqdm-toy-default") else "clip-dino")
    if evaluator == "toy":
        from .toy.evaluators import load_toy_clip, load_toy_dino

        subject_enc, clip_enc = load_toy_dino(), load_toy_clip()
    else:
        from .eval.real import ClipEncoder, DinoEncoder

        subject_enc = DinoEncoder(args.dino_id, device=args.device)
        clip_enc = ClipEncoder(args.clip_id, device=args.device)
    pipe = load_pipeline(args.pretrained_model_name_or_path, adapter=args.adapter, quantized_base=args.quantized_base,
                         device=args.device, vae_encoder=False, **_version(args), **_loading(args))
    info = {"adapter": args.adapter, "base": args.pretrained_model_name_or_path, "quantized_base": args.quantized_base,
            "instance_data_dir": str(args.instance_data_dir), "prompts": spec, "evaluator": evaluator,
            "class_word": class_word, **_version(args)}
    m = evaluate(pipe, real, prompts, args.images_per_prompt, subject_enc, clip_enc, token, out, seed=args.seed,
                 num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                 keep_token=args.keep_token_in_clip_t, info=info, replace=args.force,
                 max_sequence_length=args.max_sequence_length, release_denoiser=True)
    print(f"DINO {m['dino']:.3f}  CLIP-I {m['clip_i']:.3f}  CLIP-T {m['clip_t']:.3f}  "
          f"({len(prompts)} prompts x {args.images_per_prompt} images, {evaluator} evaluators) -> {out / METRICS}")


def _evaluate_fid(args, out: Path) -> None:
    from .eval.fid import fid_evaluate

    evaluator = args.evaluator or ("toy" if args.pretrained_model_name_or_path is None else "clip-dino")
    if evaluator == "toy":
        from .toy.evaluators import load_toy_clip

        encoder = load_toy_clip()
    else:
        from .eval.real import ClipEncoder

        encoder = ClipEncoder(args.clip_id, device=args.device)
    pipe = load_pipeline(args.pretrained_model_name_or_path, adapter=args.adapter, quantized_base=args.quantized_base,
                         device=args.device, vae_encoder=False, **_version(args), **_loading(args))
    info = {"adapter": args.adapter, "base": args.pretrained_model_name_or_path, "quantized_base": args.quantized_base,
            **_version(args)}
    m = fid_evaluate(pipe, encoder, out, num_images=args.fid_images, seed=args.seed,
                     num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, info=info,
                     replace=args.force)
    print(f"FD {m['fd']:.4f}  text score {m['text_score']:.3f} (renders {m['reference_text_score']:.3f})  "
          f"({args.fid_images} images, {encoder.name} features) -> {out / 'metrics.json'}")


def _quantize_activations(args) -> None:
    from .ptq.activation_calibration import (ACTIVATION_FILES, activations_for, calibration_prompts, folder_name,
                                             save_activations)
    ActivationConfig(bits=args.activation_bits, groups=args.groups)  # one-line errors before any loading
    check_sampling(args.guidance_scale, args.num_inference_steps, args.height, args.width, args.max_sequence_length)
    if args.out is None and args.quantized_base is None:
        raise TuneQDMError("name the output folder with --out (or pass --quantized_base to write next to it)")
    out = check_output_folder(args.out or Path(args.quantized_base) / folder_name(args.activation_bits, args.groups),
                              args.force, ACTIVATION_FILES, "activation parameters")
    calibration_prompts(args.calib_prompts, args.calib_samples, args.pretrained_model_name_or_path)  # fail early
    pipe = load_pipeline(args.pretrained_model_name_or_path, quantized_base=args.quantized_base, device=args.device,
                         height=args.height, width=args.width, vae_encoder=False, **_version(args), **_loading(args))
    set_scheduler(pipe, args.scheduler)
    q = activations_for(pipe, args.activation_bits, args.groups, prompts_file=args.calib_prompts,
                        samples=args.calib_samples, base=args.pretrained_model_name_or_path,
                        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                        max_sequence_length=args.max_sequence_length, size=(args.height, args.width))
    q.info.update(quantized_base=args.quantized_base, base=args.pretrained_model_name_or_path)
    save_activations(q, out)
    print(f"A{args.activation_bits} K={args.groups} activation parameters for {len(q.timesteps)} steps, "
          f"{len(q.layers)} layers ({q.dim_counts()}) in {q.info['calibration_seconds']} s -> {out}")


def _version(args) -> dict:
    return {"revision": args.revision, "variant": args.variant, "single_file_config": args.single_file_config}


def _add_version_flags(parser, adapter: bool = False) -> None:
    """diffusers' --revision/--variant, for a model named by --pretrained_model_name_or_path."""
    trained = "the adapter's, else " if adapter else ""
    parser.add_argument("--revision", default=None,
                        help=f"a hub id's branch, tag or commit (default: {trained}the repository's main branch)")
    parser.add_argument("--variant", default=None,
                        help="load the model's files of this variant, e.g. fp16 for *.fp16.safetensors "
                             f"(default: {trained}the files without a variant)")
    parser.add_argument("--single_file_config", default=None, metavar="FOLDER_OR_ID",
                        help="for a single-file checkpoint (--pretrained_model_name_or_path model.safetensors): the "
                             "diffusers pipeline (folder or hub id) its configs, tokenizers and missing components "
                             f"come from (default: {trained}the hub repository diffusers infers from the file)")


def _add_loading_flags(parser, train: bool = False) -> None:
    """How a model is read from its files (tuneqdm.loading): the text encoders, and the cache of quantized bases."""
    parser.add_argument("--text_encoders", choices=("stream", "resident"), default=None if train else "stream",
                        help="stream: each module's weights read from the files as it runs (the least memory: a T5-XXL "
                             "is one Linear at a time); resident: loaded whole (faster for many prompts) (default: "
                             + ("stream with the memory savers, else resident)" if train else "stream)"))
    parser.add_argument("--quantized_cache", default=None, metavar="DIR",
                        help="reuse quantized bases from DIR, and add the ones quantized now (default: $TUNEQDM_CACHE, "
                             "else ~/.cache/tuneqdm)")
    parser.add_argument("--no_quantized_cache", dest="quantized_cache", action="store_const", const=False,
                        help="quantize the base from its files every time, and write no cache entry")


def _loading(args) -> dict:
    return {"text_encoders": args.text_encoders, "quantized_cache": args.quantized_cache}


def _add_activation_flags(parser, calibrate_only: bool) -> None:
    a = parser.add_argument
    if calibrate_only:
        a("--activation_bits", type=int, default=8, help=f"activation bits: {either(ACTIVATION_BITS)} (default 8)")
    else:
        a("--activation_bits", type=int, default=None,
          help=f"quantize activations to {either(ACTIVATION_BITS)} bits (DGQ), or {FLOAT_BITS}: full precision "
               f"(default: {DYNAMIC_BITS}-bit dynamic for an --adapter trained with --activation_bits "
               f"{DYNAMIC_BITS}, else full precision)")
        a("--attention_quant", choices=ATTENTION_MODES, default="log",
          help="attention probabilities: log (DGQ's dynamic prompt-specific scale, <start> kept, levels over 16 "
               "octaves), log2 (the same with one level per octave, as published), uniform (baseline) or none "
               "(default log)")
        a("--activations", default=None,
          help="a folder of `tuneqdm quantize-activations` (default: QUANTIZED_BASE/activations-aB-kK if it "
               "exists, else calibrated now)")
    a("--groups", type=int, default=16,
      help=f"DGQ groups per layer: {either(GROUP_CHOICES)}; 1 is the layer-wise min-max baseline (default 16)")
    a("--calib_prompts", default=None,
      help="calibration prompts, one per line (default for the embedded pipeline: toy-world captions, seed 40M)")
    a("--calib_samples", type=int, default=None, help="number of calibration prompts (default: the file, or 64)")


def _method_lrs(entries, methods) -> dict[str, float]:
    lrs = {}
    for entry in entries:
        method, _, value = entry.partition("=")
        try:
            lrs[method] = float(value)
        except ValueError:
            raise TuneQDMError(f"--learning_rate {entry!r}: write METHOD=LR, e.g. fp=1e-4") from None
        if method not in methods or method == "floor":
            raise TuneQDMError(f"--learning_rate {entry!r}: {method!r} is not a trained method of --methods")
    return lrs


def _benchmark_fidelity(args) -> None:
    from .benchmarks.fidelity import FLOOR, cell_name, cells, run_cell, table
    from .toy.subjects import parse_seeds, write_subject
    from .train.config import METHOD_CHOICES

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in (*METHOD_CHOICES, FLOOR):
            raise TuneQDMError(f"unknown method {m!r} in --methods: choose from {', '.join((*METHOD_CHOICES, FLOOR))}")
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        assert 0 <= shard < shards
    except (ValueError, AssertionError):
        raise TuneQDMError(f"--shard {args.shard!r}: write i/n with 0 <= i < n, e.g. 0/2") from None
    lrs = _method_lrs(args.learning_rate, methods)
    out = Path(args.out)
    if args.table_only:
        return _fidelity_table_only(args, methods, out)
    if ("s1" in methods) != bool(args.s1_intervals):
        raise TuneQDMError("--methods s1 needs --s1_intervals (e.g. 0-250), and --s1_intervals needs s1 in --methods")
    check_writable(out)  # before the first cell trains
    subjects = []
    for seed in parse_seeds(args.subjects):
        folder = out / "subjects" / f"s{seed}"
        if not (folder / "subject.json").is_file():
            try:
                write_subject(seed, folder, force=True)
            except OSError:  # another shard wrote it at the same moment (same seed: the same files)
                if not (folder / "subject.json").is_file():
                    raise
        subjects.append(folder.name)
    if args.evaluator == "toy":
        from .toy.evaluators import load_toy_clip, load_toy_dino

        encoders = (load_toy_dino(), load_toy_clip())
    else:
        from .eval.real import ClipEncoder, DinoEncoder

        encoders = (DinoEncoder(args.dino_id), ClipEncoder(args.clip_id))
    kw = {"prompts": args.prompts, "images_per_prompt": args.images_per_prompt,
          "num_inference_steps": args.num_inference_steps, "seed": args.seed}
    source = resolve(args.pretrained_model_name_or_path)
    total, base_fingerprint = _denoiser_parameters(source), pipeline_fingerprint(source)
    todo = cells(methods, args.bits, subjects)[shard::shards]
    for i, (m, b, s) in enumerate(progress(todo, desc="benchmark fidelity: cells", unit="cell")):
        cell = out / "cells" / cell_name(m, b) / s
        r = run_cell(args.pretrained_model_name_or_path, out / "subjects" / s, m, b, args.max_train_steps, cell, kw,
                     encoders, lrs.get(m), args.s1_intervals, base_fingerprint)
        print(f"[{i + 1}/{len(todo)}] {cell_name(m, b)} {s}: DINO {r['dino']:.3f} CLIP-I {r['clip_i']:.3f} "
              f"CLIP-T {r['clip_t']:.3f}", flush=True)
    table(out, methods, args.bits, subjects, total)
    print(f"table: {out / 'fidelity.md'}")


def _denoiser_parameters(source) -> int:
    """The denoiser's parameter count, read from its files' headers (no model is built)."""
    from .shards import parameter_count

    return parameter_count(source.weight_files(source.denoiser))


def _fidelity_table_only(args, methods: list[str], out: Path) -> None:
    """The table of the finished cells of every (method, bits) asked for, missing ones left out; nothing trains."""
    from .benchmarks.fidelity import table
    from .toy.subjects import parse_seeds

    if not (out / "cells").is_dir():
        raise TuneQDMError(f"--table_only: {out} holds no finished cells; run the benchmark into it first")
    check_writable(out)
    subjects = [f"s{seed}" for seed in parse_seeds(args.subjects)]
    total = _denoiser_parameters(resolve(args.pretrained_model_name_or_path))
    result = table(out, methods, args.bits, subjects, total)
    print(f"table: {out / 'fidelity.md'} ({len(result['rows'])} rows)")


def _report(args) -> None:
    from .benchmarks.report import write_report

    out = Path(args.out) if args.out else Path(args.results) / "report.html"
    if args.screenshot and not args.screenshot.lower().endswith(".png"):
        raise TuneQDMError(f"--screenshot {args.screenshot}: give a .png file name")
    if args.screenshot:
        check_writable_file(args.screenshot, "--screenshot")
    write_report(args.results, out, args.image_format)
    print(f"report: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    if args.screenshot:
        from .eval.browser import open_in_chromium

        problems = open_in_chromium(out, Path(args.screenshot))
        if problems:
            raise TuneQDMError(f"{out} has {len(problems)} problem(s) in Chromium, the first: {problems[0]}")
        print(f"screenshot: {args.screenshot} (Chromium loaded the page with no console errors)")


PARSER_KEYS = ("command", "func")  # what argparse adds beside the flags


def train_settings(args: argparse.Namespace) -> dict:
    """The train flags as TrainConfig's keyword arguments: every flag is a field (TrainConfig refuses any other
    key, so a flag without a field fails loudly instead of being dropped; tests/test_settings.py checks parity)."""
    return {k: v for k, v in vars(args).items() if k not in PARSER_KEYS}


def _train(args) -> None:
    from .train import TrainConfig, Trainer, train

    cfg = TrainConfig(**train_settings(args))
    trainer = Trainer(cfg)
    out = train(cfg, trainer=trainer)
    if not cfg.quiet and os.environ.get("RANK", "0") == "0" and not trainer.finished:  # once, when several train
        print(f"trained {cfg.method} for {cfg.max_train_steps} steps: {out}")


def _add_train_parser(sub) -> None:
    from .train.config import DEFAULT_STEPS, LR_SCHEDULERS, METHOD_CHOICES, WEIGHTING_SCHEMES

    tr = sub.add_parser("train", help="personalize a model on a few photos (DreamBooth; diffusers' flag names)",
                        description="DreamBooth on a quantized model: only the quantization scales train "
                                    "(--method tuneqdm, peqa, mcsu, tas, s1), LoRA on the same quantized UNet "
                                    "(qlora), or the fp/lora baselines.")
    a = tr.add_argument
    a("--pretrained_model_name_or_path", default=None,
      help="a local diffusers folder or hub id (default: the embedded toy pipeline)")
    _add_version_flags(tr)
    a("--method", choices=METHOD_CHOICES, default="tuneqdm",
      help="what trains: quantization scales (peqa, tuneqdm, mcsu, tas, s1), LoRA on the float UNet (lora) or on "
           "the frozen quantized UNet (qlora), or the full UNet (fp)")
    a("--bits", type=int, choices=SUPPORTED_BITS, default=4, help="weight bits of the quantized UNet (default 4)")
    a("--experts", type=int, default=None, help="timestep experts K (default: 4 for tuneqdm and tas, else 1)")
    a("--s1_intervals", default=None, help="method s1: timestep intervals A-B[,C-D] where the tuned scales apply")
    a("--quant_init", choices=INITS, default="mse", help="quantizer initialisation (default mse)")
    a("--activation_bits", type=int, default=FLOAT_BITS,
      help=f"{DYNAMIC_BITS}: every quantized layer's input to int8 (dynamic, per token) and integer matmuls, in "
           f"training and, by default, when `generate` samples the result; {FLOAT_BITS}: float activations "
           f"(quantized methods and qlora; default {FLOAT_BITS})")
    a("--quantized_base", default=None, help="a folder of tuneqdm.save_quantized to start from (skips quantizing)")
    _add_loading_flags(tr, train=True)
    a("--rank", type=int, default=4, help="LoRA rank (methods lora and qlora, default 4)")
    a("--lora_targets", default=None, help="LoRA target modules, comma-separated (default: to_k,to_q,to_v,to_out.0)")
    a("--instance_data_dir", default=None, help="folder of 3-6 photos of the subject")
    a("--instance_prompt", default=None,
      help="prompt with a rare identifier, e.g. 'a sks dog' (default: the folder's subject.json)")
    a("--subjects", default=None,
      help='JSON list of {"instance_data_dir", "instance_prompt"}: one adapter for several subjects')
    a("--with_prior_preservation", action="store_true", help="add the class-prior loss (DreamBooth)")
    a("--class_data_dir", default=None, help="class images; missing ones are generated (default OUTPUT/class_images)")
    a("--class_prompt", default=None, help="e.g. 'a dog' (default: the folder's subject.json)")
    a("--num_class_images", type=int, default=100)
    a("--prior_loss_weight", type=float, default=1.0)
    a("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    a("--prior_inference_steps", type=int, default=25, help="sampling steps per generated class image")
    a("--resolution", type=int, default=None,
      help="square training size, a multiple of 8 up to 8192 that the model takes (default: native)")
    a("--center_crop", action="store_true", help="centre crops instead of seeded random crops")
    a("--memory_savers", action=argparse.BooleanOptionalAction, default=None,
      help="cache latents and prompt embeddings, then release the VAE and text encoders "
           "(default: on for quantized methods, off for fp/lora)")
    a("--max_sequence_length", type=int, default=None, help=MAX_SEQUENCE_LENGTH_HELP)
    a("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="logit_normal",
      help="flow-matching models (Flux, SD3): how sigma is drawn, diffusers' names ('none': uniform)")
    a("--logit_mean", type=float, default=0.0, help="mean of --weighting_scheme logit_normal")
    a("--logit_std", type=float, default=1.0, help="std of --weighting_scheme logit_normal")
    a("--mode_scale", type=float, default=1.29, help="scale of --weighting_scheme mode")
    a("--train_batch_size", type=int, default=1, help="per process")
    a("--max_train_steps", type=int, default=DEFAULT_STEPS)
    a("--learning_rate", type=float, default=None,
      help="default: RELATIVE for scale methods (each layer's s_out moves by lr x its RMS): 6e-3 for tuneqdm, "
           "2e-3 for peqa, mcsu, tas and s1; 1e-4 for lora and qlora, 5e-6 for fp")
    a("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_num_cycles", type=int, default=1)
    a("--lr_power", type=float, default=1.0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=None, help="default: 0 for scales, 1e-2 for fp/lora")
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    a("--seed", type=int, default=0, help="0 to 2**32 - 1 (numpy's range); the run is a function of it")
    a("--output_dir", default="tuneqdm-model")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    a("--validation_prompt", default=None)
    a("--num_validation_images", type=int, default=4)
    a("--validation_steps", type=int, default=100)
    a("--validation_inference_steps", type=int, default=25)
    a("--quiet", action="store_true", help="no progress bar or messages")
    a("--force", action="store_true", help="start over in an --output_dir that holds a run")
    a("--report_to", choices=("tensorboard",), default=None,
      help="also log loss and lr to TensorBoard (OUTPUT/logs; needs `pip install tensorboard`); "
           "train_log.jsonl is always written")
    tr.set_defaults(func=_train)


def _quantize(args) -> None:
    from .ptq.quantize import quantize_pipeline
    from .ptq.weights import AdaRoundConfig

    def progress(i, n, block):
        if not args.quiet:
            print(f"block {i}/{n} {block['block']}: error {block['round_to_nearest']:.3g} (round to nearest) -> "
                  f"{block['adaround']:.3g} ({block['seconds']:.0f} s)", flush=True)

    rec = quantize_pipeline(args.out, args.pretrained_model_name_or_path, args.bits, args.calibrate,
                            args.calib_prompts, args.calib_samples, args.calib_steps, args.num_inference_steps,
                            args.guidance_scale, args.seed, args.split_shortcuts,
                            AdaRoundConfig(iters=args.iters, batch_size=args.batch_size, seed=args.seed),
                            force=args.force, device=args.device, progress=progress, **_version(args))
    print(f"W{args.bits} {args.calibrate} quantized base in {args.out} ({rec['rows']} calibration rows, "
          f"{len(rec['splits'])} split convs, {rec['seconds']:.0f} s); use it with tuneqdm train --quantized_base "
          f"{args.out} --bits {args.bits} --quant_init {rec['grid_init']}")


def _add_quantize_parser(sub) -> None:
    from .ptq.weights import CALIBRATIONS, AdaRoundConfig

    q = sub.add_parser("quantize", help="post-training quantization: a calibrated quantized base (Q-Diffusion)",
                       description="Quantize the UNet's weights with timestep-aware calibration data (the fp "
                                   "pipeline's denoiser inputs at uniformly spaced DDIM steps, with classifier-free "
                                   "guidance) and write a quantized base for train/generate --quantized_base.")
    a = q.add_argument
    a("--pretrained_model_name_or_path", default=None,
      help="a local diffusers folder or hub id (default: the embedded toy pipeline). With --calibrate minmax/mse a "
           "local transformer (or a UNet with --no-split_shortcuts) is quantized tensor by tensor from its "
           "safetensors, never loading the float model")
    _add_version_flags(q)
    a("--bits", type=int, default=4, help=f"weight bits: {either(SUPPORTED_BITS)} (default 4)")
    a("--calibrate", choices=CALIBRATIONS, default="adaround",
      help="minmax / mse: round to nearest on the channel's range / on an MSE-searched clipping range; adaround: the "
           "mse grid with learned rounding, block by block against the fp model (default)")
    a("--calib_prompts", default=None,
      help="text file, one prompt per line (default for the embedded toy pipeline only: captions of toy-world "
           "scenes from seed 40000000, the PTQ calibration seeds [40M, 50M))")
    a("--calib_samples", type=int, default=32,
      help="calibration images (prompt i mod the number of prompts, seed --seed + i); each gives the UNet's inputs "
           "at every recorded step, both guidance halves: N x steps x 2 rows (Q-Diffusion's cali_n; default 32; "
           "adaround only: minmax/mse use one row, to find the shortcut splits)")
    a("--calib_steps", type=int, default=None,
      help="sampling steps recorded, uniformly spaced (default: all --num_inference_steps)")
    a("--num_inference_steps", type=int, default=25, help="sampling steps of the calibration sampling (default 25)")
    a("--guidance_scale", type=float, default=None, help=GUIDANCE_HELP)
    a("--iters", type=int, default=AdaRoundConfig.iters,
      help=f"adaround: Adam steps per block (default {AdaRoundConfig.iters})")
    a("--batch_size", type=int, default=AdaRoundConfig.batch_size,
      help=f"adaround: calibration rows per step (default {AdaRoundConfig.batch_size})")
    a("--split_shortcuts", action=argparse.BooleanOptionalAction, default=True,
      help="separate quantizers for the hidden and skip slices of up-block resnets' concatenated input (default on)")
    a("--seed", type=int, default=0, help="calibration image i uses seed + i")
    a("--device", default="cpu")
    a("--out", required=True, help="output folder (written only when calibration has finished)")
    a("--force", action="store_true", help="write into a non-empty output folder")
    a("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    q.set_defaults(func=_quantize)


def _toy_subject(args) -> None:
    from .toy.subjects import write_subject

    out = Path(args.out)
    meta = write_subject(args.seed, out, n_photos=args.photos, force=args.force)
    print(f"toy subject {args.seed}: class {meta['class']}, {len(meta['photos'])} photos, "
          f"instance prompt '{meta['instance_prompt']}', in {out}")


def _toy_scenes(args) -> None:
    import numpy as np
    from PIL import Image

    from .toy.world import make_dataset

    if args.num < 1:
        raise TuneQDMError(f"--num must be at least 1, got {args.num}")
    if args.scale < 1 or args.scale > 8:
        raise TuneQDMError(f"--scale must be between 1 and 8, got {args.scale}")
    if args.cols is not None and args.cols < 1:
        raise TuneQDMError(f"--cols must be at least 1, got {args.cols}")
    out = Path(args.out)
    if out.is_dir():
        raise TuneQDMError(f"--out {out} is a folder: give a .png file name")
    images, captions, _ = make_dataset(args.seed, args.num)
    cols = args.cols or int(np.ceil(np.sqrt(args.num)))
    rows = -(-args.num // cols)
    side, pad = images.shape[1], 2
    grid = np.full((rows * (side + pad) + pad, cols * (side + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        y, x = (pad + k * (side + pad) for k in divmod(i, cols))
        grid[y:y + side, x:x + side] = img
    picture = Image.fromarray(grid)
    if args.scale > 1:
        picture = picture.resize((grid.shape[1] * args.scale, grid.shape[0] * args.scale), Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    for text in captions:
        print(text)


GUIDANCE_HELP = ("classifier-free guidance scale; a guidance-distilled model's distilled guidance (default: the "
                 f"pipeline family's: {guidance_defaults()})")
MAX_SEQUENCE_LENGTH_HELP = ("tokens of a prompt for the T5 and language-model encoders (default: the pipeline's "
                            "own); a longer prompt is cut, with a warning")
SCHEDULER_CHOICES = ("ddim", "dpm++", "euler")
SCHEDULER_HELP = ("sampler of a DDPM-family pipeline (default: ddim); flow-matching pipelines keep their own")


def _export(args) -> None:
    from .export.command import run_export

    run_export(args)


def _add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="a trained result as LoRA files (diffusers, kohya) or a merged checkpoint",
                        description="Export a `tuneqdm train` result for other tools: --to lora writes each "
                                    "quantized layer's personalization delta (tuned minus base dequantized weight) "
                                    "as a LoRA by truncated SVD (one file per timestep expert, a schedule and a "
                                    "merged file); --to checkpoint merges the scales into a float diffusers model "
                                    "folder; --to quantized keeps a PEQA-style model's integers in optimum-quanto's "
                                    "format. docs/export.md says what each holds.")
    a = ex.add_argument
    a("--adapter", required=True, help="a `tuneqdm train` --output_dir")
    a("--to", required=True, help="lora, checkpoint, or quantized (peqa-style W2/W4 adapters: an optimum-quanto "
                                  "model folder that diffusers loads, tuneqdm's integers kept bit for bit)")
    a("--out", required=True, help="output folder (written whole, or not at all)")
    a("--format", default="diffusers",
      help="lora: diffusers (pytorch_lora_weights.safetensors, PEFT keys: pipe.load_lora_weights) or kohya "
           "(lora_unet_* keys: ComfyUI, A1111/Forge; UNet pipelines) (default: diffusers)")
    a("--rank", type=int, default=None, help="lora: one rank for every layer (capped at each layer's full rank)")
    a("--energy", type=float, default=None,
      help="lora: per layer, the smallest rank keeping this fraction of the delta's energy (default 0.9 when "
           "neither --rank nor --energy is given)")
    a("--dtype", default="fp32", help="fp32, fp16 or bf16 (default: fp32)")
    a("--expert", default=None,
      help="checkpoint, quantized: an expert index, 'blend' (every expert weighted by the share of timesteps it serves) or "
           "'base' (the dequantized base) (default: expert 0 of a one-expert adapter, else blend)")
    a("--single_file", action="store_true",
      help="checkpoint: also one .safetensors in the original LDM layout that from_single_file, ComfyUI and A1111 "
           "read (SD/SDXL UNets)")
    a("--pretrained_model_name_or_path", default=None,
      help="the base (default: the adapter's own)")
    a("--quantized_base", default=None, help="the adapter's quantized base folder (default: the one it records)")
    _add_version_flags(ex, adapter=True)
    a("--device", default="cpu")
    a("--force", action="store_true", help="replace a non-empty output folder")
    a("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    ex.set_defaults(func=_export)


class _Parser(argparse.ArgumentParser):
    """Every option's help ends with its default (subcommands inherit the class), unless the help already names
    which default applies; an option without a default says "none"."""

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and action.nargs != 0 and not action.required and action.help is not argparse.SUPPRESS:
            text = action.help or ""
            if "default" not in text.lower():
                shown = "none" if action.default is None else "%(default)s"
                action.help = f"{text} (default: {shown})" if text else f"default: {shown}"
        return action


def build_parser() -> argparse.ArgumentParser:
    from .train.config import DEFAULT_STEPS

    parser = _Parser(prog="tuneqdm", description="Quantized diffusion personalization by scale tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a tiny model, train its scales, save, reload and sample")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--steps", type=int, default=40)
    demo.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    demo.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    demo.set_defaults(func=_demo)

    _add_train_parser(sub)
    _add_quantize_parser(sub)
    _add_export_parser(sub)

    gen = sub.add_parser("generate", help="sample a pipeline (the embedded default unless a model is named)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--num_images", type=int, default=4)
    gen.add_argument("--num_inference_steps", type=int, default=25)
    gen.add_argument("--guidance_scale", type=float, default=None, help=GUIDANCE_HELP)
    gen.add_argument("--max_sequence_length", type=int, default=None, help=MAX_SEQUENCE_LENGTH_HELP)
    gen.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=None, help=SCHEDULER_HELP)
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 "
                                                              "(default: the model's native size)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8 "
                                                             "(default: the model's native size)")
    gen.add_argument("--pretrained_model_name_or_path", default=None,
                     help="a local diffusers folder or hub id (default: the embedded toy pipeline)")
    _add_version_flags(gen, adapter=True)
    _add_loading_flags(gen)
    gen.add_argument("--adapter", default=None, help="a `tuneqdm train` output folder (scales, LoRA or fp UNet)")
    gen.add_argument("--quantized_base", default=None,
                     help="a quantized base folder (tuneqdm.save_quantized; default: the one the adapter was trained "
                          "on, if its folder still exists, else none)")
    gen.add_argument("--lora", default=None, help="a diffusers/PEFT LoRA .safetensors (or folder) to add on top of "
                     "the model and any --adapter; works on the quantized UNet")
    gen.add_argument("--lora_scale", type=float, default=None, help="weight of --lora (default 1)")
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--kernels", choices=("auto", "int8", "reference"), default="auto",
                     help="quantized sampling: auto (integer matmuls where activations are quantized, where they "
                          "measured faster: on GPUs, and on CPU for dynamic activations into large layers), int8 "
                          "(integer matmuls wherever they apply) or reference (float rebuild, simulated activation "
                          "quantization)")
    gen.add_argument("--activation_quant", choices=("dgq", "dynamic"), default="dgq",
                     help="with quantized activations: dgq (calibrated groups, --activation_bits) or dynamic "
                          "(int8 per token, or per sample into k x k convs, of every quantized layer, no calibration); "
                          "default dgq")
    gen.add_argument("--out", default="samples", help="output folder (default: samples)")
    gen.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    _add_activation_flags(gen, calibrate_only=False)
    gen.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    gen.set_defaults(func=_generate)

    qa = sub.add_parser("quantize-activations", help="calibrate DGQ activation quantization (written next to a "
                                                     "quantized base)")
    qa.add_argument("--quantized_base", default=None, help="a quantized base folder (default: the float UNet)")
    qa.add_argument("--pretrained_model_name_or_path", default=None,
                    help="a local diffusers folder or hub id (default: the quantized base's, or the embedded one)")
    _add_version_flags(qa)
    _add_loading_flags(qa)
    _add_activation_flags(qa, calibrate_only=True)
    qa.add_argument("--num_inference_steps", type=int, default=25, help="the sampling schedule calibrated (25)")
    qa.add_argument("--guidance_scale", type=float, default=None, help=GUIDANCE_HELP)
    qa.add_argument("--max_sequence_length", type=int, default=None,
                    help=MAX_SEQUENCE_LENGTH_HELP + "; sample with the same")
    qa.add_argument("--height", type=int, default=None, help="image height calibrated (default: the model's native)")
    qa.add_argument("--width", type=int, default=None, help="image width calibrated (default: the model's native)")
    qa.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=None, help=SCHEDULER_HELP)
    qa.add_argument("--device", default="cpu")
    qa.add_argument("--out", default=None, help="output folder (default: QUANTIZED_BASE/activations-aB-kK)")
    qa.add_argument("--force", action="store_true", help="replace the parameters in a non-empty --out")
    qa.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    qa.set_defaults(func=_quantize_activations)

    ev = sub.add_parser("evaluate", help="DreamBooth metrics (DINO, CLIP-I, CLIP-T) of a model on a subject, or "
                                         "--metric fid (PTQ fidelity on the toy world)")
    ev.add_argument("--metric", choices=("dreambooth", "fid"), default="dreambooth",
                    help="dreambooth: subject metrics; fid: Frechet distance of CLIP-like image features, one image "
                         "per toy-world caption (world seed 50000000) vs the renders, and the text score")
    ev.add_argument("--fid_images", type=int, default=1000, help="--metric fid: images on each side (default 1000)")
    ev.add_argument("--instance_data_dir", default=None, help="the subject's real photos (--metric dreambooth)")
    ev.add_argument("--adapter", default=None, help="a `tuneqdm train` output folder (default: the base itself)")
    ev.add_argument("--pretrained_model_name_or_path", default=None,
                    help="a local diffusers folder or hub id (default: the adapter's base or the embedded pipeline)")
    _add_version_flags(ev, adapter=True)
    _add_loading_flags(ev)
    ev.add_argument("--quantized_base", default=None,
                    help="a quantized base folder (tuneqdm.save_quantized; default: the one the adapter was trained "
                         "on, if its folder still exists, else none)")
    ev.add_argument("--prompts", default=None,
                    help="dreambooth-object, dreambooth-live, toy or a file of prompts with {0} = token, {1} = class "
                         "and all else literal (default: toy for a toy subject, else dreambooth-object)")
    ev.add_argument("--images_per_prompt", type=int, default=4)
    ev.add_argument("--evaluator", choices=("toy", "clip-dino"), default=None,
                    help="toy: the shipped toy-world encoders; clip-dino: real DINO and CLIP "
                         "(default: toy on the embedded pipeline, else clip-dino)")
    ev.add_argument("--dino_id", default="facebook/dino-vits16")
    ev.add_argument("--clip_id", default="openai/clip-vit-base-patch32")
    ev.add_argument("--token", default=None, help="the rare token (default: from the instance prompt)")
    ev.add_argument("--class_word", default=None, help="default: from subject.json or the adapter")
    ev.add_argument("--keep_token_in_clip_t", action="store_true", help="score CLIP-T against the prompt as written")
    ev.add_argument("--num_inference_steps", type=int, default=25)
    ev.add_argument("--max_sequence_length", type=int, default=None, help=MAX_SEQUENCE_LENGTH_HELP)
    ev.add_argument("--guidance_scale", type=float, default=None, help=GUIDANCE_HELP)
    ev.add_argument("--seed", type=int, default=0, help="prompt p, image i uses seed + 1000 p + i")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default="evaluation")
    ev.add_argument("--force", action="store_true", help="replace an earlier evaluation in --out")
    ev.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    ev.set_defaults(func=_evaluate)

    bench = sub.add_parser("benchmark", help="benchmarks over subjects, methods and bit widths")
    bench_sub = bench.add_subparsers(dest="benchmark_command", required=True)
    fid = bench_sub.add_parser("fidelity", help="train and evaluate every (method, bits, subject); resumable")
    fid.add_argument("--subjects", default="0-9", help="toy subject seeds, e.g. 0-9 or 0,3,5 (default 0-9)")
    fid.add_argument("--methods", default="fp,peqa,tuneqdm,floor",
                     help="comma-separated: fp, lora, qlora, peqa, tuneqdm, mcsu, tas, s1, floor "
                          "(the untuned quantized model)")
    fid.add_argument("--bits", type=int, nargs="+", default=[4], choices=SUPPORTED_BITS)
    fid.add_argument("--s1_intervals", default=None, help="the timesteps S1 trains on, e.g. 0-250 (method s1 only)")
    fid.add_argument("--max_train_steps", type=int, default=DEFAULT_STEPS)
    fid.add_argument("--learning_rate", nargs="+", default=[], metavar="METHOD=LR",
                     help="per-method learning rates, e.g. fp=1e-4 tuneqdm=5e-3 (default: each method's own)")
    fid.add_argument("--pretrained_model_name_or_path", default=None, help="default: the embedded toy pipeline")
    fid.add_argument("--prompts", default="toy", help="dreambooth-object, dreambooth-live, toy or a file")
    fid.add_argument("--images_per_prompt", type=int, default=4)
    fid.add_argument("--num_inference_steps", type=int, default=25)
    fid.add_argument("--seed", type=int, default=0)
    fid.add_argument("--evaluator", choices=("toy", "clip-dino"), default="toy")
    fid.add_argument("--dino_id", default="facebook/dino-vits16")
    fid.add_argument("--clip_id", default="openai/clip-vit-base-patch32")
    fid.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (one per process)")
    fid.add_argument("--out", default="fidelity")
    fid.add_argument("--table_only", action="store_true",
                     help="train nothing: write the table of --out's finished cells (e.g. W4 ablations beside W4/W8)")
    fid.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    fid.set_defaults(func=_benchmark_fidelity)

    rep = sub.add_parser("report", help="one self-contained HTML page of an evaluation or a fidelity benchmark")
    rep.add_argument("results", help="a tuneqdm evaluate --out folder or a tuneqdm benchmark fidelity --out folder")
    rep.add_argument("--out", default=None, help="the HTML file (default: RESULTS/report.html)")
    rep.add_argument("--image_format", choices=("jpeg", "png"), default="jpeg",
                     help="how images are embedded (default jpeg: about 4x smaller; scores come from the PNGs)")
    rep.add_argument("--screenshot", default=None, metavar="PNG",
                     help="also open the page in headless Chromium (needs playwright + chromium), fail on console "
                          "errors or broken images, and save a screenshot of its top")
    rep.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    rep.set_defaults(func=_report)

    toy = sub.add_parser("toy", help="the procedural toy world: personal subjects and captioned scenes")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    subject = toy_sub.add_parser("subject", help="write a personal subject: 4-6 photos and subject.json")
    subject.add_argument("--seed", type=int, required=True, help="which subject (any integer)")
    subject.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    subject.add_argument("--photos", type=int, default=None, help="number of photos (default: 4-6, from the seed)")
    subject.add_argument("--force", action="store_true", help="replace an existing subject folder")
    subject.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    subject.set_defaults(func=_toy_subject)
    scenes = toy_sub.add_parser("scenes", help="write a grid of random scenes; prints their captions, row by row")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument("--num", type=int, default=16)
    scenes.add_argument("--out", required=True, help="output .png file")
    scenes.add_argument("--cols", type=int, default=None, help="columns (default: about the square root of --num)")
    scenes.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the grid (default: 2)")
    scenes.add_argument("--quiet", action="store_true", help="no progress bars or stage lines on stderr")
    scenes.set_defaults(func=_toy_scenes)
    return parser


@contextlib.contextmanager
def _one_line_warnings():
    """tuneqdm's data warnings as one line each (``tuneqdm: warning: ...``) during one CLI call; other warnings as
    Python shows them. ``catch_warnings`` gives the previous ``showwarning`` back on exit, so a program that calls
    ``main`` keeps its own."""

    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (TrainWarning, TuneQDMWarning)):
                print(f"tuneqdm: warning: {message}", file=sys.stderr)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show  # the documented hook, replaced inside catch_warnings only
        yield


def _output_folder(args) -> str | None:
    """The folder a command writes, held for it by ``output_lock`` (train holds its own --output_dir; the fidelity
    benchmark's shards share their --out by design; report and toy scenes write one file)."""
    if args.command in ("generate", "quantize", "evaluate", "export", "demo") or (
            args.command == "toy" and args.toy_command == "subject"):
        return args.out
    if args.command == "quantize-activations":
        return args.out or args.quantized_base  # by default written inside the quantized base's folder
    return None


def main(argv: list[str] | None = None) -> int:
    # transformers warns on import that torchvision is missing (it falls back to PIL, which is all we need)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    quiet_before = is_quiet()
    set_quiet(quiet_before or getattr(args, "quiet", False))
    try:
        folder = _output_folder(args)
        with _one_line_warnings(), output_lock(folder) if folder is not None else contextlib.nullcontext():
            args.func(args)
    except TuneQDMError as e:
        print(f"tuneqdm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # exit status 128 + signal: 130 for Ctrl-C, 143 for SIGTERM (training)
        status = getattr(e, "exit_status", 130)
        word = "terminated" if status == 143 else "interrupted"
        print(f"tuneqdm: {word}{' ' + str(e) if str(e) else ''}", file=sys.stderr)
        return status
    finally:
        set_quiet(quiet_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
