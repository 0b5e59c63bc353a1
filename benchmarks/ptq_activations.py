"""DGQ activation quantization on the embedded toy pipeline: W8A8, W4A8, W8A6, W4A6 vs the layer-wise baseline and
full precision.

    nice -n 19 python benchmarks/ptq_activations.py --out runs/ptq_act      # resumable: finished rows are kept

Rows: full precision; per weight setting (W8, W4: tuneqdm.quantize_ with MSE-clipped per-channel round-to-nearest,
PEQA scales at their initial values; a `tuneqdm quantize` base can be passed with --w8_base/--w4_base) the
weight-only model, then per activation setting (A8, A6): DGQ (K groups, log attention over 16 octaves with the
<start> token kept), DGQ with the published log2 attention (one level per octave), and the layer-wise min-max
baseline (K = 1, uniform attention). All three come from the same calibration pass:
--calib prompts from toy-world seed 40,000,000, 25 DDIM steps, guidance 7.5; groups and ranges do not depend on
the bit width, so one pass serves A8 and A6.

Metrics on --images prompts (captions of toy-world seed 50,000,000, one image each, seeds 50,000,000 + i, the same
for every row):
- Frechet distance between the CLIP-like toy evaluator's image features (128-d, normalised) of the generated
  images and of --reference procedural images of the same world seed (the prompts are the first captions of that
  set), computed by ``tuneqdm.eval.fid.feature_distance`` (as ``tuneqdm evaluate --metric fid``); with a few
  hundred generated images the absolute value is biased upwards, so compare rows only.
- CLIP-like text score: mean cosine between each image and its prompt (toy evaluator).
- Paired closeness to full precision (same prompt and seed): mean cosine of the CLIP-like image features
  (cos_to_fp) and pixel PSNR (psnr_to_fp); far less noisy than the distribution metrics at this sample size.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from tuneqdm.eval.fid import feature_distance

ROOT = Path(__file__).resolve().parents[1]
CALIB_SEED, EVAL_SEED = 40_000_000, 50_000_000
# row suffix -> (DGQ groups or 1, attention mode), and how the table names it
METHODS = {"dgq": (None, "log"), "dgq-log2": (None, "log2"), "baseline": (1, "uniform")}
INT8_SUFFIX = "-int8"  # a row sampled with --kernels int8 (integer matmuls), paired with the simulated row
METHOD_NAMES = {"dgq": "DGQ K={groups}, log attention (16 octaves)", "dgq-log2": "DGQ K={groups}, log2 attention",
                "baseline": "layer-wise min-max K=1, uniform attention"}


def table(results: dict) -> str:
    """Markdown table of the rows: fp, then per weight setting the weight-only row and DGQ / baseline per A bits."""
    rows = results["rows"]
    fp = rows.get("fp")
    order = ["fp"] + [f"W{w}{suffix}" for w in (8, 4) for suffix in
                      [""] + [f"A{a}-{m}{s}" for a in (8, 6) for m in METHODS for s in ("", INT8_SUFFIX)]]
    rows = {name: rows[name] for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order))}
    lines = ["| setting | method | Frechet distance (lower better) | CLIP-T | cos to fp | PSNR to fp (dB) | s/image |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name == "fp":
            setting, method = "W32A32", "full precision"
        elif "-" not in name:
            setting, method = f"{name}A32", "weights only"
        else:
            setting, kind = name.split("-", 1)
            integer = kind.endswith(INT8_SUFFIX)
            method = METHOD_NAMES[kind.removesuffix(INT8_SUFFIX)].format(groups=r["groups"])
            if integer:
                counts = r["kernel_layers"]
                method += f", integer matmuls ({counts['int8']} layers int8 / {counts['reference']} reference)"
        rel = ""
        if fp and name != "fp":
            rel = f" ({100 * (r['fd'] / fp['fd'] - 1):+.0f} %)"
        psnr = "-" if r["psnr_to_fp"] is None else f"{r['psnr_to_fp']:.2f}"
        lines.append(f"| {setting} | {method} | {r['fd']:.4f}{rel} | {r['clip_t']:.4f} | {r['cos_to_fp']:.4f} | {psnr} "
                     f"| {r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def ablation(args) -> dict:
    """One-step error of the noise prediction, free of trajectory divergence: the UNet inputs of full-precision
    sampling (weights quantized to --ablation_wbits, fp activations) on the first 8 evaluation prompts are replayed
    with each activation setting, and ``SQNR = 10 log10(|eps|^2 / |eps_q - eps|^2)`` is summed over all steps and
    prompts. Separates the groups (K) from the attention quantizer."""
    import tuneqdm
    from tuneqdm.ptq.activation_calibration import observe_activations
    from tuneqdm.ptq.activations import ActivationConfig
    from tuneqdm.ptq.calibration import toy_calibration_prompts
    from tuneqdm.sampling import generator, set_scheduler
    from tuneqdm.loading import pipeline_from
    from tuneqdm.toy.world import make_dataset

    pipe = pipeline_from(None)
    tuneqdm.quantize_(pipe.unet, tuneqdm.QuantConfig(bits=args.ablation_wbits, method="peqa", experts=1, init="mse"))
    set_scheduler(pipe, "ddim")
    observer = observe_activations(pipe, toy_calibration_prompts(args.calib, CALIB_SEED), args.steps, args.guidance,
                                   CALIB_SEED, args.batch)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a[0].clone(), a[1], kw["encoder_hidden_states"].clone())), with_kwargs=True)
    prompts = make_dataset(EVAL_SEED, 8)[1]
    with torch.no_grad():
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="latent",
             generator=[generator(EVAL_SEED + j) for j in range(len(prompts))])
    handle.remove()

    def predictions():
        with torch.no_grad():
            return [pipe.unet(x, t, encoder_hidden_states=e).sample for x, t, e in calls]

    reference = predictions()
    out = {}
    for bits in [int(a) for a in args.acts.split(",")]:
        for groups in (1, args.groups):
            for attention in ("none", "uniform", "log2", "log"):
                q = observer.fit(ActivationConfig(bits=bits, groups=groups, attention=attention)).install(pipe.unet)
                try:
                    pred = predictions()
                finally:
                    q.remove()
                signal = sum(float(r.square().sum()) for r in reference)
                noise = sum(float((p - r).square().sum()) for p, r in zip(pred, reference))
                name = f"W{args.ablation_wbits}A{bits} K={groups} attention={attention}"
                out[name] = round(10 * np.log10(signal / noise), 2)
                print(f"{name}: SQNR {out[name]} dB", flush=True)
    return out


def paired_difference(out: Path, first: str, second: str, ref_feats: torch.Tensor, rng, resamples: int) -> dict:
    """Row ``first`` minus row ``second`` over the same prompts and seeds (their saved per-image arrays): CLIP-T
    difference with its standard error, and the Frechet distance difference with a bootstrap standard error (the
    generated images resampled jointly for both rows; the reference set fixed)."""
    a, b = (np.load(out / f"{n}.clip_t.npy").astype(np.float64) for n in (first, second))
    d = a - b
    fa, fb = (torch.from_numpy(np.load(out / f"{n}.feats.npy")) for n in (first, second))
    boot = []
    for _ in range(resamples):
        idx = torch.from_numpy(rng.integers(0, len(d), len(d)))
        boot.append(feature_distance(fa[idx], ref_feats) - feature_distance(fb[idx], ref_feats))
    return {"images": len(d), "clip_t_diff": float(d.mean()), "clip_t_diff_se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "first_higher_fraction": float((d > 0).mean()),
            "fd_diff": feature_distance(fa, ref_feats) - feature_distance(fb, ref_feats),
            "fd_diff_bootstrap_se": float(np.std(boot, ddof=1)), "bootstrap_resamples": resamples,
            "feature_cos": float((fa * fb).sum(-1).mean())}


def paired(out: Path, ref_feats: torch.Tensor, resamples: int = 1000) -> dict:
    """DGQ minus baseline per setting (rows that saved per-image arrays; bootstrap seed 0)."""
    stats = {}
    rng = np.random.default_rng(0)
    for dgq in sorted(out.glob("*-dgq.clip_t.npy")):
        setting = dgq.name.split("-")[0]
        if not (out / f"{setting}-baseline.clip_t.npy").is_file():
            continue
        r = stats[setting] = paired_difference(out, f"{setting}-dgq", f"{setting}-baseline", ref_feats, rng, resamples)
        print(f"{setting} DGQ - baseline: CLIP-T {r['clip_t_diff']:+.5f} ± {r['clip_t_diff_se']:.5f} (SE), "
              f"FD {r['fd_diff']:+.5f} ± {r['fd_diff_bootstrap_se']:.5f} (bootstrap SE)", flush=True)
    return stats


def paired_integer(out: Path, ref_feats: torch.Tensor, resamples: int = 1000) -> dict:
    """Integer-matmul row minus its simulated twin (same calibration, prompts and seeds): whether sampling with
    ``--kernels int8`` changes the images beyond the paired noise."""
    stats = {}
    rng = np.random.default_rng(0)
    for integer in sorted(out.glob(f"*{INT8_SUFFIX}.clip_t.npy")):
        name = integer.name.removesuffix(".clip_t.npy")
        twin = name.removesuffix(INT8_SUFFIX)
        if not (out / f"{twin}.clip_t.npy").is_file():
            continue
        r = stats[twin] = paired_difference(out, name, twin, ref_feats, rng, resamples)
        print(f"{twin} integer - simulated: CLIP-T {r['clip_t_diff']:+.5f} ± {r['clip_t_diff_se']:.5f} (SE), "
              f"FD {r['fd_diff']:+.5f} ± {r['fd_diff_bootstrap_se']:.5f} (bootstrap SE), "
              f"feature cosine {r['feature_cos']:.4f}", flush=True)
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128, help="generated images per row (default 128)")
    ap.add_argument("--reference", type=int, default=1000, help="procedural reference images (default 1000)")
    ap.add_argument("--calib", type=int, default=64, help="calibration prompts (default 64)")
    ap.add_argument("--groups", type=int, default=16, help="DGQ groups (default 16)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--weights", default="8,4", help="weight bits (default 8,4)")
    ap.add_argument("--acts", default="8,6", help="activation bits (default 8,6)")
    ap.add_argument("--w8_base", default=None, help="a quantized base folder to use for W8")
    ap.add_argument("--w4_base", default=None, help="a quantized base folder to use for W4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/ptq_act")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --out's results")
    ap.add_argument("--ablation", action="store_true",
                    help="only the one-step noise-prediction SQNR of K x attention settings (added to --out's JSON)")
    ap.add_argument("--ablation_wbits", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"activation rows (default {','.join(METHODS)})")
    ap.add_argument("--int8_rows", action="store_true",
                    help="also sample every activation row with --kernels int8 (integer matmuls), paired with it")
    ap.add_argument("--paired", action="store_true",
                    help="only the paired DGQ - baseline differences of --out's rows (added to its JSON)")
    args = ap.parse_args()
    if args.ablation:
        torch.set_num_threads(args.threads)
        path = Path(args.out) / "ptq_activations.json"
        results = json.loads(path.read_text())
        results["ablation_sqnr_db"] = ablation(args)
        results["ablation_settings"] = {"wbits": args.ablation_wbits, "prompts": 8, "steps": args.steps,
                                        "calib": args.calib, "groups": args.groups}
        path.write_text(json.dumps(results, indent=1))
        return
    if args.paired:  # the reference features exactly as the rows used them
        from tuneqdm.toy.evaluators import load_toy_clip
        from tuneqdm.toy.world import make_dataset

        torch.set_num_threads(args.threads)
        path = Path(args.out) / "ptq_activations.json"
        results = json.loads(path.read_text())
        n_ref, n_img = results["settings"]["reference"], results["settings"]["images"]
        ref_images = make_dataset(EVAL_SEED, max(n_ref, n_img))[0][:n_ref]
        ref_feats = load_toy_clip().encode_images(list(ref_images))
        results["paired"] = paired(Path(args.out), ref_feats)
        results["paired_integer"] = paired_integer(Path(args.out), ref_feats)
        path.write_text(json.dumps(results, indent=1))
        return
    if args.table:
        print(table(json.loads((Path(args.out) / "ptq_activations.json").read_text())))
        return
    torch.set_num_threads(args.threads)

    import tuneqdm
    from tuneqdm.eval.evaluate import grid
    from tuneqdm.eval.fid import sample_captions
    from tuneqdm.ptq.activation_calibration import observe_activations
    from tuneqdm.ptq.activations import ActivationConfig
    from tuneqdm.ptq.calibration import toy_calibration_prompts
    from tuneqdm.quant.paths import kernel_report, set_kernels
    from tuneqdm.sampling import set_scheduler
    from tuneqdm.loading import pipeline_from
    from tuneqdm.toy.evaluators import load_toy_clip
    from tuneqdm.toy.world import make_dataset

    methods = {m: METHODS[m] for m in args.methods.split(",")} if args.methods else METHODS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "ptq_activations.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": {}}
    results["settings"] = {k: getattr(args, k) for k in ("images", "reference", "calib", "groups", "steps",
                                                          "guidance", "batch", "weights", "acts", "w8_base",
                                                          "w4_base", "threads", "methods", "int8_rows")}
    results["settings"].update(calibration_prompts=f"toy world seed {CALIB_SEED}",
                               evaluation_prompts=f"toy world seed {EVAL_SEED}", cpu_count=os.cpu_count(),
                               note="2-core CPU, sometimes shared with other jobs: times are upper bounds")

    clip = load_toy_clip()
    ref_images, captions, _ = make_dataset(EVAL_SEED, max(args.reference, args.images))
    ref_feats = clip.encode_images(list(ref_images[:args.reference]))
    prompts = captions[:args.images]
    text_feats = clip.encode_texts(prompts)
    fp_file, fp = out / "fp_pixels.npy", {}  # the fp row's pixels and features, loaded once

    def record(name, pipe, extra, after=None):
        if name in results["rows"]:
            print(f"{name}: done earlier", flush=True)
            return
        start = time.perf_counter()
        images = sample_captions(pipe, prompts, args.steps, args.guidance, seed=EVAL_SEED, batch_size=args.batch)
        seconds = time.perf_counter() - start
        feats = clip.encode_images(images)
        clip_t = (feats * text_feats).sum(-1)
        np.save(out / f"{name}.feats.npy", feats.numpy(), allow_pickle=False)  # for the paired statistics
        np.save(out / f"{name}.clip_t.npy", clip_t.numpy(), allow_pickle=False)
        pixels = np.stack([np.asarray(im) for im in images])
        if name == "fp":
            np.save(fp_file, pixels, allow_pickle=False)
        if not fp:
            fp["pixels"] = np.load(fp_file, allow_pickle=False)
            fp["feats"] = clip.encode_images(list(fp["pixels"]))
        row = {"fd": feature_distance(feats, ref_feats), "clip_t": float(clip_t.mean()),
               "cos_to_fp": float((feats * fp["feats"]).sum(-1).mean()),
               "psnr_to_fp": float(10 * np.log10(255**2 / np.mean((pixels.astype(np.float64) - fp["pixels"]) ** 2)))
               if name != "fp" else None,
               "seconds_per_image": seconds / len(images), **extra}
        if after is not None:
            after(row)
        results["rows"][name] = row
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)
        print(f"{name}: FD {row['fd']:.4f}  CLIP-T {row['clip_t']:.4f}  cos-fp {row['cos_to_fp']:.4f}  "
              f"PSNR-fp {row['psnr_to_fp']}  {row['seconds_per_image']:.2f} s/image", flush=True)
        grid([images[r * 8:(r + 1) * 8] for r in range(min(2, -(-len(images) // 8)))]).save(out / f"{name}.png")

    pipe = pipeline_from(None)
    set_scheduler(pipe, "ddim")
    record("fp", pipe, {"weights": None, "activations": None})

    for wbits in [int(w) for w in args.weights.split(",")]:
        given = getattr(args, f"w{wbits}_base", None)
        if given:
            pipe = tuneqdm.load_pipeline(quantized_base=given)
        else:
            pipe = pipeline_from(None)
            tuneqdm.quantize_(pipe.unet, tuneqdm.QuantConfig(bits=wbits, method="peqa", experts=1, init="mse"))
        set_scheduler(pipe, "ddim")
        weights = given or f"W{wbits} mse round-to-nearest (tuneqdm.quantize_)"
        record(f"W{wbits}", pipe, {"weights": weights, "activations": None})
        abits = [int(a) for a in args.acts.split(",")]
        suffixes = ("", INT8_SUFFIX)[:1 + args.int8_rows]
        todo = [f"W{wbits}A{a}-{m}{s}" for a in abits for m in methods for s in suffixes]
        if all(n in results["rows"] for n in todo):
            continue
        start = time.perf_counter()
        observer = observe_activations(pipe, toy_calibration_prompts(args.calib, CALIB_SEED), args.steps,
                                       args.guidance, CALIB_SEED, args.batch)
        calib_seconds = time.perf_counter() - start
        for a in abits:
            for method, (groups, attention) in methods.items():
                groups = groups or args.groups
                name = f"W{wbits}A{a}-{method}"
                if all(name + s in results["rows"] for s in suffixes):
                    continue
                q = observer.fit(ActivationConfig(bits=a, groups=groups, attention=attention))
                q.install(pipe.unet)
                extra = {"weights": weights, "activations": a, "groups": groups, "attention": attention,
                         "calibration_seconds": round(calib_seconds, 1), "dims": q.dim_counts()}
                try:
                    record(name, pipe, extra)
                    if args.int8_rows:
                        set_kernels(pipe.unet, "int8")
                        try:
                            record(name + INT8_SUFFIX, pipe, {**extra, "kernels": "int8"},
                                   after=lambda row, unet=pipe.unet: row.update(kernel_layers=kernel_report(unet)))
                        finally:
                            set_kernels(pipe.unet, "auto")
                finally:
                    q.remove()
    results["paired"] = paired(out, ref_feats)
    results["paired_integer"] = paired_integer(out, ref_feats)
    results_path.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"results: {results_path}")


if __name__ == "__main__":
    main()
