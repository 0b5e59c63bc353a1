"""Quantized sampling speed and memory: the fast paths of ``tuneqdm.quant.kernels`` against float and the reference.

SD-1.5-size UNet (859.5 M params, random weights), one classifier-free-guidance denoising step (batch 2, 64x64
latents, 77 text tokens), fp32 CPU; each mode in its own process (peak RSS from the kernel's counter, reset after the
model is loaded; step time = mean of the timed steps after one warm-up step, which also builds any int8 grids)::

    python benchmarks/sampling_kernels.py                         # every mode, then --toy; writes docs/benchmarks/
    python benchmarks/sampling_kernels.py --modes float,w4a8_int  # a subset
    python benchmarks/sampling_kernels.py --toy                    # only the 25-step images on the embedded pipeline
    python benchmarks/sampling_kernels.py --rounds 2               # modes interleaved, twice (a shared machine)

Each run records the load average before and after it; with ``--rounds`` the table shows each mode's mean over the
rounds (the JSON keeps every run).

Activation-quantized modes use the dynamic per-token int8 quantizer (``--activation_quant dynamic``): DGQ's
calibration of an SD-size UNet takes longer than this benchmark. The W4A8 reference is the same quantizer simulated in
float (quantize-dequantize, then the float op with the rebuilt weight), as DGQ's code and ``--kernels reference`` do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tuneqdm.files import atomic_dir
from tuneqdm.memory import reset_peak_rss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_memory import CACHE, float_unet, quantized_base, rss_peak_bytes

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "sampling_kernels"
# mode -> (weight bits or None, activations quantized, kernels)
MODES = {
    "float": (None, False, None),
    "w4_ref": (4, False, "reference"),
    "w4_fast": (4, False, "auto"),
    "w8a8_int": (8, True, "int8"),
    "w4a8_int": (4, True, "int8"),
    "w4a8_ref": (4, True, "reference"),
    "w4a8_auto": (4, True, "auto"),
    "w8a8_auto": (8, True, "auto"),
    "w4_cached": (4, False, "reference"),  # toy: generate's float weight cache (256 MiB under reference kernels)
}
TOY_MODES = ("float", "w4_ref", "w4_cached", "w4_fast", "w4a8_int", "w4a8_ref", "w4a8_auto")
GRID_BYTES = 256 * 2**20  # int8 grids held by w4_fast (not the library default, which holds none: measured slower)


def _grid_bytes(mode: str) -> int:
    from tuneqdm.quant.kernels import DEFAULT_GRID_BYTES

    return GRID_BYTES if mode == "w4_fast" else DEFAULT_GRID_BYTES


def _configure(model, mode) -> None:
    """The kernels and the activation quantizer of ``mode`` on a quantized model."""
    from tuneqdm.ptq.activations import DynamicActivations
    from tuneqdm.quant.paths import set_kernels

    bits, activations, kernels = MODES[mode]
    if bits is not None:
        set_kernels(model, kernels)
    if activations:
        DynamicActivations().install(model)


def run_unet_step(mode: str, steps: int) -> dict:
    import tuneqdm
    from tuneqdm.quant.paths import kernel_report, sampling_kernels

    # glibc's mmap threshold is left alone, as `generate` leaves it. Pinned (as training pins it), every large
    # temporary is a fresh mapping whose pages the kernel zeroes: the W4A8 step measured 1.7x slower (6.6 against
    # 3.9 s) and float 1.25x (8.3 against 6.6 s), for 0.17 GiB less peak RSS.
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    bits = MODES[mode][0]
    unet = float_unet() if bits is None else tuneqdm.load_quantized(quantized_base(bits))
    unet.eval()
    _configure(unet, mode)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    reset_peak_rss()
    times, cpu = [], []
    with torch.no_grad(), sampling_kernels(unet, _grid_bytes(mode)):
        for step in range(steps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            unet(latents, torch.tensor([500, 500]), encoder_hidden_states=text)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"mode": mode, "threads": torch.get_num_threads(), "first_step_s": times[0],
            "s_per_step": sum(times[1:]) / steps, "cpu_s_per_step": sum(cpu[1:]) / steps,
            "steps_timed": steps, "peak_rss_gib": rss_peak_bytes() / 2**30,
            "paths": kernel_report(unet) if bits is not None else None}


def run_toy(mode: str, images: int) -> dict:
    import tuneqdm
    from tuneqdm.quant.paths import kernel_report, sampling_kernels
    from tuneqdm.sampling import generate
    from tuneqdm.loading import load_pipeline

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    pipe = load_pipeline()
    bits = MODES[mode][0]
    if bits is not None:
        tuneqdm.quantize_(pipe.unet, tuneqdm.QuantConfig(bits=bits, method="peqa"))
    _configure(pipe.unet, mode)
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    with sampling_kernels(pipe.unet, _grid_bytes(mode)):  # generate's own session nests inside this one
        generate(pipe, "a red box on a table", images, 25, seed=0, batch_size=4,
                 weight_cache_bytes=None if mode == "w4_cached" else 0)  # None: generate's default
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"mode": mode, "images": images, "steps": 25, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_rss_gib": rss_peak_bytes() / 2**30,
            "paths": kernel_report(pipe.unet) if bits is not None else None}


# ---- the whole `tuneqdm generate` process on an SD-1.5-size pipeline (--generate) -----------------------------------
# mode -> (weight bits or None, extra `tuneqdm generate` arguments)
GENERATE_MODES = {
    "float": (None, []),
    "w4": (4, []),
    "w4a8_auto": (4, ["--activation_bits", "8", "--activation_quant", "dynamic"]),
    "w4a8_ref": (4, ["--activation_bits", "8", "--activation_quant", "dynamic", "--kernels", "reference"]),
}
GENERATE_STEPS = 8


def sd15_pipeline() -> Path:
    """An SD-1.5-size pipeline on disk, built once: the benchmark's random SD-1.5-size UNet (seed 0), a small
    random VAE (4 latent channels, 8x down, 32-64 channels) and a 2-layer random CLIP text encoder of SD 1.5's width
    (768) with the embedded toy pipeline's tokenizer, DDIM. The UNet is what the issue measures; the small VAE and
    text encoder keep the rest of the process cheap, as in the issue's reference figures."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from tuneqdm.loading import load_pipeline

    path = CACHE / "sd15-pipeline"
    if (path / "model_index.json").is_file():
        return path
    tokenizer = load_pipeline().tokenizer
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=12, max_position_embeddings=tokenizer.model_max_length, projection_dim=768))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 32, 64, 64), norm_num_groups=32, sample_size=512)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=float_unet(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(tmp)
    return path


def sd15_pipeline_base(bits: int) -> Path:
    """``tuneqdm quantize`` of :func:`sd15_pipeline` (min-max round to nearest, streamed from its safetensors), built
    once."""
    path = CACHE / f"sd15-pipeline-w{bits}"
    if not path.is_dir():
        subprocess.run(["tuneqdm", "quantize", "--pretrained_model_name_or_path", str(sd15_pipeline()), "--bits",
                        str(bits), "--calibrate", "minmax", "--no-split_shortcuts", "--out", str(path), "--quiet"],
                       check=True)
    return path


def run_generate(mode: str) -> dict:
    """One `tuneqdm generate` process (one image, GENERATE_STEPS DDIM steps, 512x512); its wall time, CPU time and
    peak RSS (this process's only child, so RUSAGE_CHILDREN is that process alone)."""
    import resource
    import tempfile

    bits, extra = GENERATE_MODES[mode]
    cmd = ["tuneqdm", "generate", "--pretrained_model_name_or_path", str(sd15_pipeline()), "--prompt",
           "a photo of a dog on the beach", "--num_images", "1", "--num_inference_steps", str(GENERATE_STEPS),
           "--seed", "0", "--quiet"]
    cmd += [] if bits is None else ["--quantized_base", str(sd15_pipeline_base(bits))]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + extra + ["--out", out], capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"mode": mode, "command": " ".join(cmd[:2] + cmd[4:] + extra), "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "stderr": proc.stderr[-600:], "paths": None}


def in_subprocess(args: list[str]) -> dict:
    load_before = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{args} failed:\n{out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # 1-minute, before and after
    print(json.dumps(row), file=sys.stderr)
    return row


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per mode (in first-seen order): the mean of its numeric fields over the rounds."""
    by_mode: dict[str, list[dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).append(r)
    out = []
    for runs in by_mode.values():
        row = dict(runs[0])
        for key, value in runs[0].items():
            if isinstance(value, float):
                row[key] = sum(r[key] for r in runs) / len(runs)
        row["load_average"] = [min(min(r["load_average"]) for r in runs), max(max(r["load_average"]) for r in runs)]
        out.append(row)
    return out


def table(rows, key, cpu_key, unit) -> list[str]:
    """Wall time and process CPU time (1 thread: the CPU time is what the shared machine cannot inflate much)."""
    base = next((r for r in rows if r["mode"] == "float"), None)
    header = (f"| mode | wall {unit} | CPU {unit} | CPU x float | peak RSS GiB | layers: int8 / int8-grid / reference "
              "| load average |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r[cpu_key] / base[cpu_key]:.2f}" if base else "-"
        paths = "-" if not r["paths"] else " / ".join(str(v) for v in r["paths"].values())
        load = "-".join(f"{v:.1f}" for v in r["load_average"])
        lines.append(f"| {r['mode']} | {r[key]:.2f} | {r[cpu_key]:.2f} | {ratio} | {r['peak_rss_gib']:.2f} | {paths} "
                     f"| {load} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=2, help="timed UNet steps per mode after the warm-up (default 2)")
    ap.add_argument("--toy", action="store_true", help="only the embedded toy pipeline's 25-step images")
    ap.add_argument("--toy_images", type=int, default=8)
    ap.add_argument("--generate", action="store_true",
                    help=f"only the whole `tuneqdm generate` process on an SD-1.5-size pipeline (1 image, "
                         f"{GENERATE_STEPS} DDIM steps), modes {', '.join(GENERATE_MODES)}")
    ap.add_argument("--rounds", type=int, default=1, help="run the modes interleaved this many times (default 1)")
    ap.add_argument("--out", type=Path, default=OUT, help="prefix of the .json/.md written (default docs/benchmarks/)")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one mode in this process: "unet|toy|generate:MODE"
    args = ap.parse_args()
    if args.run:
        kind, mode = args.run.split(":")
        runners = {"unet": lambda: run_unet_step(mode, args.steps), "toy": lambda: run_toy(mode, args.toy_images),
                   "generate": lambda: run_generate(mode)}
        print(json.dumps(runners[kind]()))
        return
    if args.generate:
        return generate_main(args)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}: choose from {', '.join(MODES)}")
    toy_modes = [m for m in TOY_MODES if m in modes or args.toy]
    unet_runs, toy_runs = [], []
    for _ in range(args.rounds):  # interleaved: a change in the machine's load hits every mode alike
        unet_runs += [] if args.toy else [in_subprocess(["--run", f"unet:{m}", "--steps", str(args.steps)]) for m in modes]
    for _ in range(args.rounds):
        toy_runs += [in_subprocess(["--run", f"toy:{m}", "--toy_images", str(args.toy_images)]) for m in toy_modes]
    unet_rows, toy_rows = mean_rows(unet_runs), mean_rows(toy_runs)
    result = {"command": " ".join(["python", "benchmarks/sampling_kernels.py", *sys.argv[1:]]),
              "torch": torch.__version__, "threads": int(os.environ.get("BENCH_THREADS", "1")), "rounds": args.rounds,
              "unet_step": unet_rows, "toy_images": toy_rows, "unet_runs": unet_runs, "toy_runs": toy_runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"Command: `{result['command']}`", ""]
    if unet_rows:
        md += ["SD-1.5-size UNet, one CFG step (batch 2, 64x64):", "", *table(unet_rows, "s_per_step", "cpu_s_per_step", "s/step"), ""]
    if toy_rows:
        md += [f"Embedded toy pipeline, {args.toy_images} images x 25 steps:", "",
               *table(toy_rows, "seconds", "cpu_seconds", "s"), ""]
    args.out.with_suffix(".table.md").write_text("\n".join(md))
    print("\n".join(md))


def generate_main(args) -> None:
    """Every GENERATE_MODES row, each `tuneqdm generate` in its own process, interleaved over ``--rounds``."""
    sd15_pipeline()
    for bits in {b for b, _ in GENERATE_MODES.values()} - {None}:
        sd15_pipeline_base(bits)
    runs = [in_subprocess(["--run", f"generate:{m}"]) for _ in range(args.rounds) for m in GENERATE_MODES]
    rows = mean_rows(runs)
    result = {"command": " ".join(["python", "benchmarks/sampling_kernels.py", *sys.argv[1:]]),
              "torch": torch.__version__, "rounds": args.rounds, "steps": GENERATE_STEPS, "generate": rows,
              "generate_runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"Command: `{result['command']}`", "",
          f"The whole `tuneqdm generate` process, SD-1.5-size pipeline, 1 image 512x512, {GENERATE_STEPS} DDIM steps:",
          "", *table(rows, "seconds", "cpu_seconds", "s"), ""]
    args.out.with_suffix(".table.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
