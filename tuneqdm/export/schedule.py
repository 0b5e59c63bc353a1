"""Which expert LoRA each sampling step uses, and the switch that applies it in a diffusers pipeline.

tuneqdm routes a denoiser call with timestep ``t`` (its own argument) to expert ``min(floor(t·c·K/T), K−1)``, where
``c`` converts the denoiser's timestep into training timesteps (FLUX.1 passes t/1000: c = 1000; see
``tuneqdm.families.timestep_scale``), or, for S1, to the tuned set inside its intervals and the base elsewhere. The
schedule written beside exported expert LoRAs states that rule as intervals of the denoiser's own timestep argument,
and lists the route of every step of the base pipeline's own scheduler at its default step count.

``use_lora_experts(pipe, folder)`` loads every expert LoRA as a named adapter and installs a forward pre-hook on the
denoiser that activates, before each call, the adapter of the call's timestep, by ``tuneqdm.tuning.routing``'s own
functions: the routing is tuneqdm's, step for step (the base route disables the LoRA).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ..families import denoiser, denoiser_component, timestep_scale
from ..errors import TuneQDMError
from ..files import read_json
from ..hooks import on_timestep
from ..libraries import load_lora_weights
from ..tuning.routing import BASE, expert_for_timestep, s1_route
from .deltas import route_weights
from .lora import EXPERTS_DIR, EXPORT_JSON

ADAPTER_PREFIX = "tuneqdm_expert_"


def route_of(t, cfg: dict, scale: float) -> int:
    """The route of a denoiser call at timestep ``t`` (its own units; all samples of the call must share it)."""
    t = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1) * scale
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise TuneQDMError("the LoRA expert switch sets one adapter per denoiser call, but this call mixes timesteps: "
                           "sample with one timestep per call (every diffusers pipeline does)")
    if cfg["intervals"]:
        return int(s1_route(t[:1], [tuple(i) for i in cfg["intervals"]])[0])
    return int(expert_for_timestep(t[:1], cfg["experts"], cfg["num_train_timesteps"])[0])


def intervals(cfg: dict, scale: float) -> list[dict]:
    """The routes as half-open intervals ``[from, to)`` of the denoiser's timestep argument (None: unbounded)."""
    T = cfg["num_train_timesteps"]
    if cfg["intervals"]:
        inside = [{"from": a / scale, "to": b / scale, "route": 0} for a, b in cfg["intervals"]]
        return sorted(inside, key=lambda i: i["from"]) + [{"rest": True, "route": BASE}]
    K = cfg["experts"]
    return [{"from": None if k == 0 else k * T / K / scale, "to": None if k == K - 1 else (k + 1) * T / K / scale,
             "route": k} for k in range(K)]


def scheduler_steps(pipe, cfg: dict) -> dict | None:
    """The route of every step of the pipeline's own scheduler at the pipeline's default step count (None when the
    scheduler's timesteps depend on the image size: dynamic shifting)."""
    scheduler = pipe.scheduler
    if scheduler.config.get("use_dynamic_shifting"):
        return None
    default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    steps = default.default if default is not None and isinstance(default.default, int) else 50
    scheduler.set_timesteps(steps)
    scale = timestep_scale(denoiser(pipe))
    timesteps = scheduler.timesteps.double() / scale  # what the pipeline passes its denoiser (FLUX.1: t / 1000)
    runs = []
    for i, t in enumerate(timesteps.tolist()):
        route = route_of(t, cfg, scale)
        if runs and runs[-1]["route"] == route:
            runs[-1].update(last_step=i, last_timestep=round(t, 6))
        else:
            runs.append({"route": route, "first_step": i, "last_step": i, "first_timestep": round(t, 6),
                         "last_timestep": round(t, 6)})
    return {"scheduler": type(scheduler).__name__, "num_inference_steps": steps, "runs": runs}


def schedule(pipe, cfg: dict) -> dict:
    """The schedule recorded in lora_export.json for a K-expert or S1 adapter."""
    scale = timestep_scale(denoiser(pipe))
    rule = (f"route = min(floor(t * {scale:g} * {cfg['experts']} / {cfg['num_train_timesteps']}), "
            f"{cfg['experts'] - 1})" if not cfg["intervals"] else
            f"route = 0 (the tuned LoRA) where t * {scale:g} lies in one of {cfg['intervals']}, else no LoRA")
    return {"timestep": f"the {denoiser_component(pipe)}'s own timestep argument t", "timestep_scale": scale,
            "rule": rule, "intervals": intervals(cfg, scale), "steps": scheduler_steps(pipe, cfg),
            "files": {str(k): f"{EXPERTS_DIR}/{k}/pytorch_lora_weights.safetensors"
                      for k in route_weights(cfg) if k != BASE},
            "routing": {k: cfg[k] for k in ("experts", "num_train_timesteps", "intervals")}}


def read_export(folder) -> dict:
    """lora_export.json of an exported LoRA folder, checked for what the switch reads."""
    folder = Path(folder)
    record = read_json(folder / EXPORT_JSON, "LoRA export")
    if record.get("kind") != "lora" or not isinstance(record.get("files"), dict):
        raise TuneQDMError(f"{folder / EXPORT_JSON} is not a tuneqdm LoRA export: export the adapter again")
    return record


def use_lora_experts(pipe, folder, scale: float = 1.0):
    """Load an exported LoRA folder into a diffusers pipeline on its float base: every expert LoRA as an adapter
    named ``tuneqdm_expert_<k>``, switched per denoiser call by tuneqdm's own routing (a one-expert export: its one
    file). Returns the hook handle (``.remove()`` stops switching)."""
    folder = Path(folder)
    record = read_export(folder)
    model = denoiser(pipe)
    sched = record.get("schedule")
    if sched is None:  # one expert: no switching
        load_lora_weights(pipe, str(folder), adapter_name=f"{ADAPTER_PREFIX}0")
        pipe.set_adapters([f"{ADAPTER_PREFIX}0"], adapter_weights=[scale])
        return None
    if sched["timestep_scale"] != timestep_scale(model):
        raise TuneQDMError(f"{folder} was exported for a denoiser whose timestep scale is {sched['timestep_scale']}, "
                           f"this pipeline's is {timestep_scale(model)}: load it into the pipeline it was made for")
    names = {}
    for route, file in sched["files"].items():
        if record["files"].get(file) is None:
            continue  # an expert that training never moved runs without LoRA
        names[int(route)] = f"{ADAPTER_PREFIX}{route}"
        load_lora_weights(pipe, str(folder / Path(file).parent), adapter_name=names[int(route)])
    return _install_switch(pipe, model, names, sched["routing"], sched["timestep_scale"], scale)


def _install_switch(pipe, model, names: dict[int, str], routing: dict, ts_scale: float, scale: float):
    current = {"route": None}

    def switch(t, _call) -> None:
        if t is None:
            return
        route = route_of(t, routing, ts_scale)
        if route == current["route"]:
            return
        current["route"] = route
        if route in names:
            model.enable_lora()
            pipe.set_adapters([names[route]], adapter_weights=[scale])
        else:
            model.disable_lora()

    handle = on_timestep(model, switch)
    if handle is None:
        raise TuneQDMError(f"{type(model).__name__}.forward has no timestep argument: the expert switch cannot route it")
    return handle
