"""Fuzzer of tuneqdm's files: seeded mutations of saved adapters, quantized-base folders, checkpoints, LoRA and
fine-tuned results, DGQ activation folders, pipeline folders and report inputs.

    python benchmarks/fuzz_files.py --cases 300 --seed 0 --out fuzz.json

Each case copies a pristine folder (tiny models built in code), applies one mutation (a bit flip in the safetensors
payload or header, truncation, appended bytes, a JSON key deleted, a JSON value of another type or another value,
an extra or a missing file) and loads it. Every case must end in one of two outcomes:

- ``identical``: the load succeeded and gave the same model: bit-identical tensors and outputs (checkpoints: the same
  trainable tensors, optimizer, lr-scheduler and RNG states after ``restore``);
- ``refused``: a one-line ``TuneQDMError``.

Pipeline folders (the embedded toy pipeline: ``model_index.json``, each component's ``config.json``, the scheduler's
config) and report inputs (an evaluation's ``metrics.json``) carry no digests: only those files are mutated, and a
third outcome is allowed, ``changed``: the mutated file describes another valid pipeline or record, which loads
(one image sampled) or renders consistently.

Anything else is a failure: ``different`` (a silently changed model), ``crash`` (another exception), ``multiline``
(an error of more than one line) or ``inconsistent`` (a pipeline loaded while diffusers or transformers warned of
weights unused, missing or newly initialized). The JSON output holds the counts per kind and mutation and the first
failures; the exit status is 1 when there is any failure. ``tests/test_fuzz_files.py`` runs it with a small count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

KINDS = ("adapter", "quantized_base", "checkpoint", "lora_result", "fp_result", "activations", "pipeline", "report")
MUTATIONS = ("payload_bit", "header_bit", "truncate", "append", "json_delete", "json_retype", "json_change",
             "extra_file", "missing_file")
# pipeline folders and report inputs carry no digests (a hub download, an evaluation's record): their configuration
# files are mutated, whole or edited, and a mutation may describe another valid model or record
CONFIG_MUTATIONS = ("truncate", "json_delete", "json_retype", "json_change", "missing_file")
# "changed": the pipeline or record loaded consistently as another valid one (pipeline and report kinds only);
# "inconsistent": a pipeline loaded while its libraries warned of weights unused, missing or newly initialized
FAILURES = ("different", "crash", "multiline", "inconsistent")
CHANGEABLE = ("pipeline", "report")  # kinds whose mutated files may validly describe something else


# ---- tiny subjects ---------------------------------------------------------------------------------------------
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    )


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 800]), torch.randn(2, 3, 8, generator=g)


@torch.no_grad()
def _outputs(model) -> torch.Tensor:
    x, t, emb = _inputs()
    return model(x, t, emb).sample


class Subject:
    """A pristine folder of one kind, how to load it, and what its loaded model must equal."""

    def __init__(self, kind: str, root: Path):
        self.kind, self.root = kind, root
        getattr(self, f"_setup_{kind}")()

    # adapter: scales of every expert perturbed, loaded onto its quantized base
    def _setup_adapter(self):
        import tuneqdm
        from tuneqdm.serialization import adapter_state

        model = tuneqdm.quantize_(tiny_unet(), tuneqdm.QuantConfig(bits=4, method="tuneqdm", experts=4, init="mse"))
        self.base = tuneqdm.save_quantized(model, self.root / "base")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in tuneqdm.scale_parameters(model):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        self.folder = tuneqdm.save_adapter(model, self.root / "pristine", extra={"prompts": ["a sks toy"]})
        self.want = {"tensors": adapter_state(model), "out": _outputs(model)}

    def _load_adapter(self, folder):
        import tuneqdm
        from tuneqdm.serialization import adapter_state

        model = tuneqdm.load_adapter(tuneqdm.load_quantized(self.base), folder)
        return {"tensors": adapter_state(model), "out": _outputs(model)}

    # quantized base: packed integers, zero-points, scales and every other tensor, config.json, quantization.json
    def _setup_quantized_base(self):
        import tuneqdm

        model = tuneqdm.quantize_(tiny_unet(), tuneqdm.QuantConfig(bits=4, method="tuneqdm", experts=2, init="mse"))
        self.folder = tuneqdm.save_quantized(model, self.root / "pristine", base_id="tiny")
        self.want = self._state_of_base(model)

    @staticmethod
    def _state_of_base(model):
        import tuneqdm
        from tuneqdm.tuning.model import quant_state

        state = quant_state(model)
        return {"class": type(model).__name__, "config": state.config.to_dict(), "base_id": state.base_id,
                "fingerprint": tuneqdm.fingerprint(model), "out": _outputs(model),
                "tensors": {k: v for k, v in model.state_dict().items()}}

    def _load_quantized_base(self, folder):
        import tuneqdm

        return self._state_of_base(tuneqdm.load_quantized(folder))

    # checkpoint: trainable tensors, AdamW moments after 3 steps, a cosine lr schedule, RNG states
    @staticmethod
    def _training():
        from diffusers.optimization import get_scheduler

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)

    def _setup_checkpoint(self):
        from tuneqdm.train import checkpoint as ckpt

        model, optimizer, scheduler = self._training()
        for _ in range(3):
            model(torch.randn(5, 4)).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        rng = _rng_states()
        self.folder = ckpt.save(self.root / "run", 3, dict(model.named_parameters()), optimizer, scheduler,
                                {"identity": {"method": "tuneqdm", "experts": 4}, "settings": {"lr": 1e-2}})
        self.want = {"step": 3, "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                     "info": {"identity": {"method": "tuneqdm", "experts": 4}, "settings": {"lr": 1e-2}}}
        _set_rng_states(rng)

    def _load_checkpoint(self, folder):
        from tuneqdm.train import checkpoint as ckpt
        from tuneqdm.train.methods import load_trainable_state

        tensors, meta = ckpt.load(folder)
        model, optimizer, scheduler = self._training()
        load_trainable_state(model, ckpt.model_tensors(tensors), folder)  # what the training loop does to resume
        ckpt.restore(tensors, meta, optimizer, scheduler)
        return {"step": int(meta["step"]), "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_states(),
                "info": {"identity": meta.get("identity"), "settings": meta.get("settings")}}

    # lora / fp results: the weight files and training.json that generate --adapter checks before diffusers reads them
    def _result(self, kind: str):
        from safetensors.torch import save_file

        from tuneqdm.results import LORA_WEIGHTS, TRAINING_JSON, result_digests

        folder = self.root / "pristine"
        folder.mkdir()
        if kind == "lora":
            g = torch.Generator().manual_seed(2)
            tensors = {f"unet.down_blocks.0.attentions.0.{p}.lora.{d}.weight": torch.randn(s, generator=g)
                       for p in ("to_q", "to_k") for d, s in (("down", (4, 8)), ("up", (8, 4)))}
            save_file(tensors, folder / LORA_WEIGHTS, metadata={"format": "pt"})
        else:
            tiny_unet().save_pretrained(folder / "unet", safe_serialization=True)
        info = {"tuneqdm_method": kind, "base_id": "tiny", "steps": 3, "instance_prompts": ["a sks box"],
                "classes": ["box"], "settings": {"learning_rate": 1e-4}}
        (folder / TRAINING_JSON).write_text(json.dumps({**info, "digests": result_digests(folder, kind, info)}))
        self.folder = folder
        self.want = self._load_result(folder)

    def _setup_lora_result(self):
        self._result("lora")

    def _setup_fp_result(self):
        self._result("fp")

    @staticmethod
    def _load_result(folder):
        from safetensors.torch import load_file

        from tuneqdm.files import read_json
        from tuneqdm.results import check_result, weight_files

        kind, info = check_result(folder)
        tensors = {k: v for f in weight_files(folder, kind) for k, v in load_file(f).items()}
        config = read_json(folder / "unet" / "config.json", "fine-tuned model") if kind == "fp" else None
        if kind == "fp":  # what load_pipeline builds from the files it checked
            from tuneqdm.loading.adapters import fine_tuned_denoiser

            tensors = {"out": _outputs(fine_tuned_denoiser(folder).eval())}
        return {"kind": kind, "tensors": tensors, "config": config,
                "info": {k: v for k, v in info.items() if k != "digests"}}

    _load_lora_result = _load_fp_result = _load_result

    # DGQ activation parameters of two layers and two steps, one grouping channels and one positions
    def _setup_activations(self):
        from tuneqdm.ptq.activation_calibration import save_activations
        from tuneqdm.ptq.activations import ActivationQuantizer, LayerParams
        from tuneqdm.ptq.config import ActivationConfig

        g = torch.Generator().manual_seed(4)
        lo = -torch.rand(2, 2, generator=g) - 0.1
        layers = {
            "a": LayerParams(False, torch.tensor([0, 0], dtype=torch.int8),
                             torch.randint(0, 2, (2, 6), generator=g, dtype=torch.uint8),
                             torch.zeros(2, 0, dtype=torch.uint8), lo, -lo),
            "b": LayerParams(True, torch.tensor([1, 0], dtype=torch.int8),
                             torch.randint(0, 2, (2, 3), generator=g, dtype=torch.uint8),
                             torch.randint(0, 2, (2, 5), generator=g, dtype=torch.uint8), 2 * lo, -3 * lo),
        }
        q = ActivationQuantizer(ActivationConfig(bits=8, groups=2, exclude=()), [900.0, 100.0], layers,
                                {"fingerprint": "0123456789abcdef"})
        self.folder = save_activations(q, self.root / "pristine")
        self.want = self._load_activations(self.folder)

    @staticmethod
    def _load_activations(folder):
        from tuneqdm.ptq.activation_calibration import load_activations

        q = load_activations(folder)
        return {"config": (q.config.bits, q.config.groups, q.config.exclude), "timesteps": q.timesteps,
                "info": q.info, "layers": {n: (p.conv, p.dims, p.channel_labels, p.position_labels, p.lo, p.hi)
                                            for n, p in q.layers.items()}}

    # pipeline: the embedded toy pipeline's folder (weights hard-linked: only its configuration files are mutated),
    # loaded as `tuneqdm generate` loads a base and sampled for one image
    def _setup_pipeline(self):
        import os

        from tuneqdm.toy.pipeline import DEFAULT_PIPELINE_DIR

        def link_weights(src, dst):
            return os.link(src, dst) if src.endswith(".safetensors") else shutil.copy2(src, dst)

        self.folder = self.root / "pristine"
        shutil.copytree(DEFAULT_PIPELINE_DIR, self.folder)  # a copy: the cases' links never reach the package
        self.copy_function = link_weights
        self.want = self._load_pipeline(self.folder)

    @staticmethod
    def _load_pipeline(folder):
        from tuneqdm.loading import load_pipeline
        from tuneqdm.sampling import generate

        with _weight_notices() as notices:
            pipe = load_pipeline(str(folder))
        if notices:
            raise Inconsistent(notices[0])
        image = generate(pipe, "a red box on the beach", 1, num_inference_steps=2, seed=0)[0]
        return {"class": type(pipe).__name__, "image": np.asarray(image)}

    # report: an evaluation folder as `tuneqdm evaluate` writes it (metrics.json, images/, photos/), rendered
    def _setup_report(self):
        from PIL import Image

        folder = self.root / "pristine"
        (folder / "images").mkdir(parents=True)
        (folder / "photos").mkdir()
        rng = np.random.default_rng(5)
        for name in ("images/000_0.png", "images/000_1.png", "images/001_0.png", "images/001_1.png", "photos/0.png"):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
        prompts = [{"prompt": p, "clip_t_text": p.replace("sks ", ""), "seeds": [1000 * i, 1000 * i + 1],
                    "dino": 0.1 * i + 0.05, "clip_i": 0.6 + 0.01 * i, "clip_t": 0.2 - 0.01 * i}
                   for i, p in enumerate(("a sks box on the beach", "a red sks box"))]
        metrics = {"format_version": 1, "dino": 0.1, "clip_i": 0.605, "clip_t": 0.195, "subject_encoder": "toy-dino",
                   "clip_encoder": "toy-clip", "clip_t_keeps_token": False, "token": "sks", "images_per_prompt": 2,
                   "num_inference_steps": 2, "guidance_scale": 7.5, "seed": 0, "real_images": 1, "adapter": None,
                   "base": None, "quantized_base": None, "instance_data_dir": "photos", "prompts": "p.txt",
                   "evaluator": "toy", "class_word": "box", "revision": None, "variant": None,
                   "single_file_config": None, "per_prompt": prompts}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        self.folder = folder
        self.want = self._load_report(folder)

    @staticmethod
    def _load_report(folder):
        from tuneqdm.benchmarks.report import render

        return {"page": render(folder, "png").replace(str(folder), "FOLDER").replace(folder.name, "FOLDER")}

    def editable(self, folder: Path) -> list[Path] | None:
        """The files this kind's mutations touch (None: every file): a pipeline's configurations (model_index.json,
        each component's config.json, the scheduler's), a report's metrics.json."""
        if self.kind == "pipeline":
            return sorted([folder / "model_index.json", *folder.glob("*/config.json"),
                           *folder.glob("*/scheduler_config.json")])
        if self.kind == "report":
            return [folder / "metrics.json"]
        return None

    @property
    def mutations(self) -> tuple[str, ...]:
        return CONFIG_MUTATIONS if self.kind in CHANGEABLE else MUTATIONS

    def load(self, folder):
        return getattr(self, f"_load_{self.kind}")(folder)


class Inconsistent(Exception):
    """A pipeline loaded while diffusers or transformers warned that weights were unused, missing or initialized."""


WEIGHT_NOTICES = ("were not used when initializing", "newly initialized", "were not initialized", "missing keys",
                  "unexpected keys", "Missing key", "Unexpected key")


@contextlib.contextmanager
def _weight_notices():
    """The warnings (logged or raised) of diffusers and transformers about weights a load did not match."""
    import logging
    import warnings

    found: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if record.levelno >= logging.WARNING and any(n in text for n in WEIGHT_NOTICES):
                found.append(text.splitlines()[0][:200])

    catch = Catch()
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(catch)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found += [str(w.message).splitlines()[0][:200] for w in caught
                  if any(n in str(w.message) for n in WEIGHT_NOTICES)]
    finally:
        for logger in loggers:
            logger.removeHandler(catch)


def _rng_states():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_states(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(a, b) -> bool:
    """Deep equality; tensors and arrays must agree in dtype, shape and every bit (NaN == NaN)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and _raw(a).equal(_raw(b)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


# ---- mutations -------------------------------------------------------------------------------------------------
def _files(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file())


def _header_end(data: bytes) -> int:
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    return min(8 + n, len(data))


def _flip(rng, folder, header: bool) -> str:
    path = rng.choice(_files(folder, ".safetensors"))
    data = bytearray(path.read_bytes())
    end = _header_end(data)
    pos = rng.randrange(0, end) if header else rng.randrange(end, len(data))
    bit = rng.randrange(8)
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))
    return f"{path.name}: bit {bit} of byte {pos}"


def _truncate(rng, folder, editable=None) -> str:
    path = rng.choice(editable or _files(folder, ".safetensors") + _files(folder, ".json"))
    data = path.read_bytes()
    cut = rng.randrange(0, len(data))
    path.write_bytes(data[:cut])
    return f"{path.name}: {cut} of {len(data)} bytes"


def _append(rng, folder) -> str:
    path = rng.choice(_files(folder, ".safetensors"))
    extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64])))
    path.write_bytes(path.read_bytes() + extra)
    return f"{path.name}: +{len(extra)} bytes"


def _pick_path(rng, obj) -> list:
    """A random key path into a JSON value: descend one random key or index at a time, stopping half of the time."""
    path = []
    while isinstance(obj, (dict, list)) and obj:
        key = rng.choice(list(obj)) if isinstance(obj, dict) else rng.randrange(len(obj))
        path.append(key)
        obj = obj[key]
        if rng.random() < 0.5:
            break
    return path


def _other_value(rng, value):
    """A value of the same JSON type that differs (or, when that type has no neighbours, another one)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value - 1, 0 if value else 1, value * 2 + 1, 10**6, 2**62, -1])
    if isinstance(value, float):
        return rng.choice([value * 1.5 + 1e-3, -value - 1e-3, 0.0, float("nan"), float("inf"), 1e300])
    if isinstance(value, str):
        return rng.choice([value + "x", "", value[:-1], value.upper() + "_", "0" * 16])
    if isinstance(value, list):
        return value[1:] if value and rng.random() < 0.5 else value + value[:1] + [0]
    if isinstance(value, dict):
        return {**value, "extra": rng.randrange(100)}
    return rng.choice([0, "x", 1.5])


def _json_edit(rng, folder, how: str, editable=None) -> str:
    path = rng.choice(editable or _files(folder, ".json"))
    obj = json.loads(path.read_text())
    keys = _pick_path(rng, obj)
    if not keys:
        return f"{path.name}: nothing to edit"
    parent = obj
    for k in keys[:-1]:
        parent = parent[k]
    last = keys[-1]
    if how == "json_delete":
        del parent[last]
    elif how == "json_retype":
        old = parent[last]
        choices = [v for v in (None, True, 7, 2.5, "abc", [], {}, [1, 2], {"a": 1})
                   if type(v) is not type(old)]
        parent[last] = rng.choice(choices)
    else:
        parent[last] = _other_value(rng, parent[last])
    path.write_text(json.dumps(obj))
    return f"{path.name}: {how[5:]} {'.'.join(map(str, keys))[:120]}"


def _extra_file(rng, folder) -> str:
    name = rng.choice(["extra.bin", "notes.json", "model.safetensors", "adapter_model.bin", ".hidden"])
    (folder / name).write_bytes(bytes(rng.randrange(256) for _ in range(32)))
    return name


def _missing_file(rng, folder, editable=None) -> str:
    path = rng.choice(editable or sorted(p for p in folder.rglob("*") if p.is_file()))
    path.unlink()
    return path.name


def mutate(rng: random.Random, folder: Path, mutation: str, editable: list[Path] | None = None) -> str:
    """Apply one mutation to the files of ``folder`` (``editable``: only to those); returns what was done."""
    if mutation in ("payload_bit", "header_bit"):
        return _flip(rng, folder, header=mutation == "header_bit")
    if mutation.startswith("json_"):
        return _json_edit(rng, folder, mutation, editable)
    if mutation in ("extra_file", "append"):
        return {"extra_file": _extra_file, "append": _append}[mutation](rng, folder)
    return {"truncate": _truncate, "missing_file": _missing_file}[mutation](rng, folder, editable)


# ---- running ---------------------------------------------------------------------------------------------------
def classify(subject: Subject, folder: Path) -> tuple[str, str]:
    """(outcome, detail) of loading ``folder``."""
    from tuneqdm import TuneQDMError

    try:
        got = subject.load(folder)
    except TuneQDMError as e:
        return ("multiline" if "\n" in str(e) else "refused"), str(e)[:300]
    except Inconsistent as e:
        return "inconsistent", str(e)
    except Exception as e:  # noqa: BLE001 -- the fuzzer's whole point: any other exception is a finding
        return "crash", f"{type(e).__name__}: {str(e)[:300]}"
    if same(got, subject.want):
        return "identical", ""
    if subject.kind in CHANGEABLE:
        return "changed", "loaded consistently as another valid configuration"
    return "different", "loaded a model that differs"


def strip_digests(folder: Path) -> None:
    """Make a pristine folder look written before tuneqdm stored digests (its structural checks alone then guard it)."""
    for path in _files(folder, ".json"):
        obj = json.loads(path.read_text())
        if isinstance(obj, dict) and obj.pop("digests", None) is not None:
            path.write_text(json.dumps(obj))


def fuzz(kind: str, cases: int, seed: int = 0, workdir: Path | None = None, without_digests: bool = False) -> dict:
    """Run ``cases`` mutations of one kind; counts per mutation and outcome, plus the failures."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        subject = Subject(kind, root)
        if without_digests:
            strip_digests(subject.folder)
        mutations = subject.mutations
        by_mutation = {m: {} for m in mutations}
        failures = []
        for i in range(cases):
            mutation = mutations[i % len(mutations)]
            rng = random.Random(seed * 1_000_003 + i)
            folder = root / f"case-{i}"
            shutil.copytree(subject.folder, folder, copy_function=getattr(subject, "copy_function", shutil.copy2))
            what = mutate(rng, folder, mutation, subject.editable(folder))
            outcome, detail = classify(subject, folder)
            counts = by_mutation[mutation]
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in FAILURES:
                failures.append({"kind": kind, "case": i, "mutation": mutation, "what": what, "outcome": outcome,
                                 "detail": detail})
            shutil.rmtree(folder)
    totals = {}
    for counts in by_mutation.values():
        for outcome, n in counts.items():
            totals[outcome] = totals.get(outcome, 0) + n
    return {"cases": cases, "totals": totals, "by_mutation": by_mutation, "failures": failures}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300, help="cases per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: stdout only)")
    parser.add_argument("--without_digests", action="store_true",
                        help="strip the digests first, as in files of older tuneqdm versions: payload bit flips then "
                             "load changed models by design; everything else must still hold")
    args = parser.parse_args(argv)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = {"command": "python benchmarks/fuzz_files.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "seed": args.seed, "cases_per_kind": args.cases, "without_digests": args.without_digests, "kinds": {}}
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        result["kinds"][kind] = fuzz(kind, args.cases, args.seed, without_digests=args.without_digests)
        result["kinds"][kind]["seconds"] = round(time.perf_counter() - t0, 1)
    result["failures"] = sum(len(r["failures"]) for r in result["kinds"].values())
    result["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
