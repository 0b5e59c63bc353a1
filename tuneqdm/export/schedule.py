"""Which expert LoRA each sampling step uses, and the switch that applies it in a diffusers pipeline.

tuneqdm routes a denoiser call with timestep ``t`` (its own argument) to expert ``min(floor(u·K/T), K−1)``, where
``u = offset + scale·t`` is ``t`` in training timesteps by its family's conversion (``tuneqdm.families
.training_timesteps``: FLUX.1 passes sigma, (0, 1000); Z-Image 1 − sigma, (1000, −1000)), or, for S1, to the tuned
set inside its intervals and the base elsewhere. The schedule written beside exported expert LoRAs states that rule,
the same as intervals of the denoiser's own timestep argument, and the route of every step of the base pipeline's own
scheduler at its default step count; every route in it is computed by the router's own functions on the family's
own conversion, so an exported schedule routes each step as tuneqdm's sampling does.

``use_lora_experts(pipe, folder)`` loads every expert LoRA as a named adapter and installs a forward pre-hook on the
denoiser that activates, before each call, the adapter of the call's timestep, by ``tuneqdm.tuning.routing``'s own
functions: the routing is tuneqdm's, step for step (the base route disables the LoRA).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ..families import (denoiser, denoiser_component, family, model_timesteps, timestep_argument, timestep_conversion,
                        training_timesteps)
from ..errors import TuneQDMError
from ..files import read_json
from ..hooks import on_timestep
from ..libraries import load_lora_weights
from ..tuning.routing import BASE, expert_for_timestep, s1_route
from .deltas import route_weights
from .lora import EXPERTS_DIR, EXPORT_JSON

ADAPTER_PREFIX = "tuneqdm_expert_"


def route_of(t, cfg: dict, model) -> int:
    """The route of a call of ``model`` at timestep ``t`` (its own argument; all samples of the call must share it),
    converted to training timesteps as the router converts it."""
    t = training_timesteps(model, torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1))
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise TuneQDMError("the LoRA expert switch sets one adapter per denoiser call, but this call mixes timesteps: "
                           "sample with one timestep per call (every diffusers pipeline does)")
    if cfg["intervals"]:
        return int(s1_route(t[:1], [tuple(i) for i in cfg["intervals"]])[0])
    return int(expert_for_timestep(t[:1], cfg["experts"], cfg["num_train_timesteps"])[0])


def _conversion(model) -> dict:
    offset, scale = timestep_conversion(model)
    return {"offset": offset, "scale": scale}


def intervals(cfg: dict, model) -> list[dict]:
    """The routes as intervals of the denoiser's timestep argument (None: unbounded), ascending: half-open
    ``[from, to)`` where the argument grows with the training timestep, ``(from, to]`` where it falls with it
    (Z-Image's 1 − sigma)."""
    rising = timestep_conversion(model)[1] > 0

    def own(training: float | None) -> float | None:
        return None if training is None else float(model_timesteps(model, torch.tensor(float(training),
                                                                                        dtype=torch.float64)))

    def interval(lo, hi, route) -> dict:
        a, b = own(lo), own(hi)
        return {"from": a, "to": b, "route": route} if rising else {"from": b, "to": a, "route": route}

    T = cfg["num_train_timesteps"]
    if cfg["intervals"]:
        inside = [interval(a, b, 0) for a, b in cfg["intervals"]]
        return sorted(inside, key=lambda i: i["from"]) + [{"rest": True, "route": BASE}]
    K = cfg["experts"]
    routes = [interval(None if k == 0 else k * T / K, None if k == K - 1 else (k + 1) * T / K, k) for k in range(K)]
    return routes if rising else routes[::-1]


def scheduler_steps(pipe, cfg: dict, steps: int | None = None) -> dict | None:
    """The route of every step of the pipeline's own scheduler at ``steps`` steps (None: the pipeline's default step
    count); None when the scheduler's timesteps depend on the image size (dynamic shifting)."""
    scheduler, model = pipe.scheduler, denoiser(pipe)
    if scheduler.config.get("use_dynamic_shifting"):
        return None
    if steps is None:
        default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
        steps = default.default if default is not None and isinstance(default.default, int) else 50
    sigmas = family(pipe).sampling_sigmas(pipe, steps)  # the ones the pipeline's call hands its scheduler
    if sigmas is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(sigmas=sigmas)
    timesteps = model_timesteps(model, scheduler.timesteps.double())  # what the pipeline passes its denoiser
    runs = []
    for i, t in enumerate(timesteps.tolist()):
        route = route_of(t, cfg, model)
        if runs and runs[-1]["route"] == route:
            runs[-1].update(last_step=i, last_timestep=round(t, 6))
        else:
            runs.append({"route": route, "first_step": i, "last_step": i, "first_timestep": round(t, 6),
                         "last_timestep": round(t, 6)})
    return {"scheduler": type(scheduler).__name__, "num_inference_steps": steps, "runs": runs}


def schedule(pipe, cfg: dict, steps: int | None = None) -> dict:
    """The schedule recorded in lora_export.json for a K-expert or S1 adapter (``steps``: the step count of its
    ``steps`` runs, None for the pipeline's default)."""
    model = denoiser(pipe)
    conversion, argument = _conversion(model), timestep_argument(model)
    u = (f"{argument} * {conversion['scale']:g}" if not conversion["offset"] else
         f"({conversion['offset']:g} + {argument} * {conversion['scale']:g})")
    rule = (f"route = min(floor({u} * {cfg['experts']} / {cfg['num_train_timesteps']}), {cfg['experts'] - 1})"
            if not cfg["intervals"] else
            f"route = 0 (the tuned LoRA) where {u} lies in one of {cfg['intervals']}, else no LoRA")
    return {"timestep": f"the {denoiser_component(pipe)}'s own timestep argument {argument}",
            "timestep_argument": argument, "training_timestep": conversion,
            "interval_bounds": "[from, to)" if conversion["scale"] > 0 else "(from, to]",
            "rule": rule, "intervals": intervals(cfg, model), "steps": scheduler_steps(pipe, cfg, steps),
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
    # exports before the conversion was recorded held its scale only (an offset of 0)
    recorded = sched.get("training_timestep") or {"offset": 0.0, "scale": sched.get("timestep_scale")}
    if recorded != _conversion(model):
        def said(c):
            return f"{c.get('offset')} + {c.get('scale')}·t"

        raise TuneQDMError(f"{folder} was exported for a denoiser whose timestep t is {said(recorded)} training "
                           f"timesteps, this pipeline's is {said(_conversion(model))}: load it into the pipeline it "
                           "was made for (or export the adapter again)")
    names = {}
    for route, file in sched["files"].items():
        if record["files"].get(file) is None:
            continue  # an expert that training never moved runs without LoRA
        names[int(route)] = f"{ADAPTER_PREFIX}{route}"
        load_lora_weights(pipe, str(folder / Path(file).parent), adapter_name=names[int(route)])
    return _install_switch(pipe, model, names, sched["routing"], scale)


def _install_switch(pipe, model, names: dict[int, str], routing: dict, scale: float):
    current = {"route": None}

    def switch(t, _call) -> None:
        if t is None:
            return
        route = route_of(t, routing, model)
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
