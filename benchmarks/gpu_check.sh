#!/usr/bin/env bash
# The GPU check of the real-size loading path (issue 26), prepared to run in <= 8 minutes on one GPU.
#
# What it measures, per pipeline (SD-1.5 size; FLUX.1 width with 1 double + 2 single blocks and a 2-layer T5-XXL),
# each run its own process: `tuneqdm train --mixed_precision bf16 --gradient_checkpointing`, 512 px, 3 steps, for
# TuneQDM W4, qlora W4 and LoRA on the float model; the peak CUDA memory of every phase and of the loop (training.json,
# train_log.jsonl: torch's allocator counts) and s/step of the last step; the whole process's host peak RSS beside it.
#
# Preparation (here, once: the GPU image has torch, transformers, accelerate, peft and safetensors, not diffusers):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
# Run it through the device tool with `carry: [".whl"]`:
#   bash benchmarks/gpu_check.sh        (results in $OUT/gpu_check.json, or ./gpu_check.json without $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
work=${TMPDIR:-/tmp}/tuneqdm-gpu-check
out=${OUT:-.}/gpu_check.json
mkdir -p "$work"
python3 - "$work" "$out" <<'EOF'
import json, os, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import real_size

work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for model, kwargs in (("sd15", {}), ("flux-width", {"flux_blocks": (1, 2), "t5_layers": 2})):
    folder = work / model
    if not (folder / "model_index.json").is_file():
        real_size.make(model, folder, **kwargs)
    for method in ("tuneqdm", "qlora", "lora"):
        run = work / f"{model}-{method}"
        argv = [sys.executable, "-m", "tuneqdm.cli", "train", "--pretrained_model_name_or_path", str(folder),
                "--instance_data_dir", str(real_size.PHOTOS), "--instance_prompt", "a sks dog", "--method", method,
                "--bits", "4", "--max_train_steps", "3", "--resolution", "512", "--gradient_checkpointing",
                "--mixed_precision", "bf16", "--output_dir", str(run), "--force", "--quiet"]
        row = {"model": model, "method": method, **real_size.measure(argv, dict(os.environ), work, method)}
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
        memory = json.loads((run / "training.json").read_text())["memory"]
        row.update(cuda_peak_gib=round(memory["peak_mib"] / 1024, 3), s_per_step=log[-1]["s_per_step"],
                   cuda_phases_gib={k: round(v / 1024, 3) for k, v in memory["phases_mib"].items()},
                   loop_cuda_peak_gib=round(max(r["peak_mem_mib"] for r in log) / 1024, 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
import torch

out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
EOF
