"""PTQ weights on the embedded toy model: full precision vs W-bit minmax / mse / adaround (Frechet distance of the
CLIP-like image features and text score, `tuneqdm evaluate --metric fid`) and the calibration time.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/ptq_weights.py --bits 4 --fid_images 1000 --out ptq-bench

Each cell runs the CLI (`tuneqdm quantize ...`, then `tuneqdm evaluate --metric fid --quantized_base ...`) and is
skipped when its output exists, so an interrupted run resumes. Calibration time is measured as wall time and as the
process's CPU time (user + sys) of the quantize call. ``renders`` is the FD between two disjoint sets of toy-world
renders (seeds 50,000,000 and 51,000,000) of the same size: the metric's floor at that sample size. Writes
``OUT/ptq_weights.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _run(argv: list[str]) -> None:
    from tuneqdm.cli import main

    rc = main(argv)
    if rc != 0:
        sys.exit(f"tuneqdm {' '.join(argv)} failed with status {rc}")


def _eval(out: Path, name: str, args, extra: list[str]) -> dict:
    folder = out / f"eval-{name}"
    if not (folder / "metrics.json").is_file():
        _run(["evaluate", "--metric", "fid", "--fid_images", str(args.fid_images), "--out", str(folder)] + extra)
    return json.loads((folder / "metrics.json").read_text())


def renders_floor(n: int) -> float:
    from tuneqdm.eval.fid import EVALUATION_SEED, feature_distance, toy_reference
    from tuneqdm.toy.evaluators import load_toy_clip

    clip = load_toy_clip()
    a, _ = toy_reference(n, EVALUATION_SEED)
    b, _ = toy_reference(n, EVALUATION_SEED + 1_000_000)
    return feature_distance(clip.encode_images(a), clip.encode_images(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4])
    p.add_argument("--calibrations", default="minmax,mse,adaround")
    p.add_argument("--fid_images", type=int, default=1000)
    p.add_argument("--calib_samples", type=int, default=32)
    p.add_argument("--iters", type=int, default=None, help="adaround iterations per block (default: the CLI's)")
    p.add_argument("--skip_fp", action="store_true", help="do not evaluate the full-precision model")
    p.add_argument("--out", default="ptq-bench")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if not args.skip_fp:
        m = _eval(out, "fp", args, [])
        rows.append({"model": "fp", "bits": None, "calibrate": None, "fd": m["fd"], "text_score": m["text_score"]})
    for bits in args.bits:
        for cal in args.calibrations.split(","):
            name = f"w{bits}-{cal}"
            base = out / name
            if not (base / "quantization.json").is_file():
                argv = ["quantize", "--bits", str(bits), "--calibrate", cal, "--calib_samples", str(args.calib_samples),
                        "--out", str(base), "--quiet"]
                if args.iters is not None:
                    argv += ["--iters", str(args.iters)]
                t0, c0 = time.perf_counter(), _cpu_seconds()
                _run(argv)
                (base.parent / f"{name}.time.json").write_text(json.dumps(
                    {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_seconds() - c0}))
            timing = json.loads((base.parent / f"{name}.time.json").read_text())
            cal_rec = json.loads((base / "quantization.json").read_text())["calibration"]
            m = _eval(out, name, args, ["--quantized_base", str(base)])
            rows.append({"model": name, "bits": bits, "calibrate": cal, "fd": m["fd"], "text_score": m["text_score"],
                         "calibration_rows": cal_rec["rows"], "split_convs": len(cal_rec["splits"]),
                         "quantize_wall_s": timing["wall_s"], "quantize_cpu_s": timing["cpu_s"],
                         "adaround_iters": (cal_rec.get("adaround") or {}).get("iters")})
    result = {"fid_images": args.fid_images, "world_seed": 50_000_000, "calib_samples": args.calib_samples,
              "renders_fd": renders_floor(args.fid_images),
              "reference_text_score": m["reference_text_score"], "rows": rows}
    (out / "ptq_weights.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
