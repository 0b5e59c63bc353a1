"""The DreamBooth training loop on accelerate: the steps, their log, validation images, checkpoints and the
result; a NaN or a signal stops it with the last good checkpoint named. What it builds on has its own module: what
a run builds before its first step (``setup``), the run folder and resume identity (``run_folder``), the examples
(``examples``), the batches (``batches``), the accelerator (``accelerator``), signals (``signals``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import TrainWarning, TuneQDMError
from ..files import WRITE_ERRORS, atomic_dir, output_lock, write_error_reason
from ..loading import assemble
from ..progress import pipeline_progress, progress, quiet_while
from ..sampling import generate
from . import checkpoint as ckpt
from .batches import step_seed
from .config import LORA_METHODS, TrainConfig
from .methods import trainable_state
from .outputs import save_result
from .run_folder import LOG, latest_checkpoint, model_identity, prepare_log
from .setup import TrainingSetup
from .signals import Signals, TrainingInterrupted


class Trainer(TrainingSetup):
    """One training run: ``setup`` (``TrainingSetup``) builds it, ``run`` is the loop."""

    def _identity(self) -> dict:
        """What must agree between a checkpoint and the run resuming it (recorded in checkpoints and training.json)."""
        return {**self.identity, **model_identity(self.fingerprint, self.resolution)}

    # ---- one step --------------------------------------------------------------------------------------------
    def batch(self, micro_step: int) -> dict:
        """This process's share of the global batch of ``micro_step``: inputs of the denoiser and the target."""
        return self.batches.draw(micro_step)

    def loss(self, b: dict) -> torch.Tensor:
        pred = self.tensors.denoising.predict(self.unet, b["noisy"], b["timesteps"], b["cond"])
        target, t, k = b["target"], b["timesteps"], b["n_instance"]
        loss = self.objective.loss
        if not self.cfg.with_prior_preservation:
            return loss(pred, target, t)
        return loss(pred[:k], target[:k], t[:k]) + self.cfg.prior_loss_weight * loss(pred[k:], target[k:], t[k:])

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to ``--max_train_steps``: per step, the update and its log row, the callbacks, the checkpoint and
        validation schedules; then the result. Ctrl-C or SIGTERM save a checkpoint and stop."""
        cfg = self.cfg
        if self.finished:
            return self.out
        bar = progress(total=cfg.max_train_steps, initial=self.step, desc="train", unit="step", disable=not self.main)
        log = self._open_log()
        with Signals() as signals:  # the log's peak is the loop's; training.json has every phase's and the whole's
            with self.memory.phase("loop"), self._closing(bar, log), self._checkpoint_on_signal(signals, bar):
                while self.step < cfg.max_train_steps:
                    loss, lr = self._step(signals, log)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    bar.update(1)
                    for cb in self.callbacks:
                        cb(self, self.step)
                    if self._checkpoint_due():
                        with signals.held():
                            self.save_checkpoint()
                    if self._validation_due():
                        self.validate()
            with signals.held(deliver=False), self.memory.phase("save"):
                self._save_result()
        self.acc.end_training()
        return self.out

    def _step(self, signals, log) -> tuple[float, float]:
        """One optimizer step (all its micro-steps) and its log row; a signal during the update waits for its end."""
        cfg, acc = self.cfg, self.acc
        t0 = time.perf_counter()
        losses = []
        with contextlib.ExitStack() as update:
            for micro in range(cfg.gradient_accumulation_steps):
                with acc.accumulate(self.unet):
                    loss = self.loss(self.batch(self.step * cfg.gradient_accumulation_steps + micro))
                    losses.append(self._mean_loss(loss))
                    if loss.requires_grad:  # s1: a batch routed wholly to the frozen base scales trains nothing
                        acc.backward(loss)
                    if acc.sync_gradients:
                        update.enter_context(signals.held())  # a Ctrl-C during the update waits for its end
                        if cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            lr = self._learning_rate()
            self.lr_scheduler.step()
            self.step += 1
            loss_value = sum(losses) / len(losses)
            self._log_step(log, loss_value, lr, time.perf_counter() - t0)
        return loss_value, lr

    def _mean_loss(self, loss: torch.Tensor) -> float:
        """The micro-step's loss averaged over the processes; a NaN stops the run (the last good checkpoint named)."""
        mean_loss = self.acc.gather(loss.detach()[None]).mean()
        if not torch.isfinite(mean_loss):
            self._diverged(f"loss became NaN at step {self.step + 1}")
        return float(mean_loss)

    def _learning_rate(self) -> float:
        """This step's ``--learning_rate`` as the schedule sets it: for the scale methods the relative rate, which each
        layer's ``s_out`` group runs at a multiple of (``scale_param_groups``). All diffusers schedules are LambdaLR."""
        schedule = self.lr_scheduler
        return self.cfg.lr * schedule.lr_lambdas[0](schedule.last_epoch)

    def _log_step(self, log, loss: float, lr: float, seconds: float) -> None:
        """The step's row of ``train_log.jsonl`` (main process) and of the tracker (``--report_to``)."""
        if self.main:
            row = {"step": self.step, "loss": round(loss, 6), "lr": lr, "s_per_step": round(seconds, 4),
                   "peak_mem_mib": round(self.memory.current() / 2**20, 1),
                   "peak_mem": "cuda" if self.memory.cuda else "rss"}
            try:
                log.write(json.dumps(row) + "\n")
                log.flush()
            except WRITE_ERRORS as e:
                raise self._write_failed(e, self.out / LOG) from None
        if self.cfg.report_to == "tensorboard":
            self.acc.log({"loss": loss, "lr": lr, "s_per_step": seconds}, step=self.step)

    def _checkpoint_due(self) -> bool:
        """Every ``--checkpointing_steps`` steps, except at the end (the result is written then)."""
        return self.step % self.cfg.checkpointing_steps == 0 and self.step < self.cfg.max_train_steps

    def _validation_due(self) -> bool:
        return bool(self.cfg.validation_prompt) and self.step % self.cfg.validation_steps == 0

    def _open_log(self):
        """The output folder made ready (``run_folder.prepare_log``), the tracker started and the log opened for
        appending: on the main process; None on the others."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        log = prepare_log(self.out, cfg, self.step, resumed=bool(self.resumed_from)) if self.main else None
        if cfg.report_to == "tensorboard":
            self.acc.init_trackers("tuneqdm", config={k: v for k, v in cfg.to_dict().items()
                                                      if isinstance(v, (bool, int, float, str))})
        return open(log, "a") if self.main else None  # closed by _closing

    @contextlib.contextmanager
    def _closing(self, bar, log):
        """The bar and the log closed and the trackers flushed, however the loop ends."""
        try:
            yield
        finally:
            bar.close()
            if log is not None:
                log.close()
            for tracker in self.acc.trackers:
                tracker.finish()

    @contextlib.contextmanager
    def _checkpoint_on_signal(self, signals, bar):
        """Ctrl-C or SIGTERM in the loop: a checkpoint of the last finished step (a second signal does not abort the
        save), then ``TrainingInterrupted`` naming it."""
        try:
            yield
        except KeyboardInterrupt as e:
            bar.close()
            signum = getattr(e, "signum", signal.SIGINT)
            with signals.held(deliver=False):
                where = self.save_checkpoint()
            tail = f"; checkpoint {where}: continue with --resume_from_checkpoint latest" if where else ""
            raise TrainingInterrupted(f"at step {self.step}{tail}", signum) from None

    def _save_result(self):
        """The trained result, unless the weights are not finite (then the last good checkpoint is named)."""
        cfg, acc = self.cfg, self.acc
        acc.wait_for_everyone()
        if not self._finite():  # e.g. a huge learning rate in the last steps: never store such an adapter
            self._diverged(f"the trained weights became NaN or infinite at step {self.step}")
        if not self._outputs_finite():  # finite scales can still be so large that sampling overflows
            self._diverged(f"the trained model's output became NaN or infinite at step {self.step} (its weights are "
                           "finite but far too large)", keep_current=False)
        if self.main:
            try:
                save_result(self.model, self.out, cfg.method, self.pipeline_class, self.info())
            except WRITE_ERRORS as e:
                raise self._write_failed(e, f"the result into {self.out}") from None
            if cfg.validation_prompt and self.step % cfg.validation_steps != 0:
                self.validate()
        acc.wait_for_everyone()

    def info(self) -> dict:
        cfg = self.cfg
        return {"tuneqdm_method": cfg.method, "base_id": self.base_id, "steps": self.step,
                **({"base_fingerprint": self.fingerprint} if cfg.method in LORA_METHODS else {}),
                "instance_prompts": [s.instance_prompt for s in self.subjects],
                "class_prompts": sorted({s.class_prompt for s in self.subjects if s.class_prompt}),
                "classes": [s.noun for s in self.subjects],
                "instance_data_dirs": [str(s.instance_data_dir) for s in self.subjects],
                "validation_prompt": self.validation_prompt, "resolution": self.resolution,
                "quantized_base": str(Path(cfg.quantized_base).resolve()) if cfg.quantized_base else None,
                "learning_rate": cfg.lr, "lr_is_relative": cfg.trains_scales, "settings": cfg.to_dict(),
                "activation_bits": cfg.activation_bits,  # `generate` samples the result with these by default
                "identity": self._identity(), "memory": self.memory.record()}

    def save_checkpoint(self) -> Path | None:
        """Write the state after ``self.step`` completed steps (main process); others wait."""
        acc, path = self.acc, None
        if not self._finite():  # never store a diverged state as a checkpoint
            self._diverged(f"the trained weights became NaN or infinite at step {self.step}")
        acc.wait_for_everyone()
        if self.main:
            path = self._write_checkpoint()
        acc.wait_for_everyone()
        return path

    def _write_checkpoint(self) -> Path:
        path = ckpt.checkpoint_dir(self.out, self.step)
        if not (path / ckpt.STATE_JSON).is_file():
            path = ckpt.save(self.out, self.step, trainable_state(self.model), self.optimizer, self.lr_scheduler,
                             {"identity": self._identity(), "data_order": {"seed": self.cfg.seed,
                              "micro_steps_done": self.step * self.cfg.gradient_accumulation_steps},
                              "settings": self.cfg.to_dict()}, self.cfg.checkpoints_total_limit)
        return path

    def _write_failed(self, e: BaseException, what) -> TuneQDMError:
        """The one-line error of a failed write (main process) after keeping the current state as a checkpoint
        when it is finite and the disk takes it, else naming the newest good one."""
        where = None
        if self.step > 0 and self._finite():
            with contextlib.suppress(TuneQDMError):
                where = self._write_checkpoint()
        if where is None:
            where = latest_checkpoint(self.out)
        kept = (f"the last good checkpoint is {where}: make room and continue with --resume_from_checkpoint latest"
                if where else "no checkpoint could be kept")
        return TuneQDMError(f"cannot write {what} ({write_error_reason(e)}); nothing partial was left, {kept}")

    def _finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    @torch.no_grad()
    def _outputs_finite(self) -> bool:
        """One denoiser forward per quarter of the timesteps (every expert), on fixed noise and the first prompt:
        the probe of what sampling will do. Its own generator: the run's random draws are untouched."""
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, 0, stream=99))
        device = self.acc.device
        noise = self.tensors.denoising.to_model_layout(torch.randn((1, *self.batches.latent_shape), generator=gen))
        noise = noise.to(device)
        cond = self.tensors.conditioning([self.examples.instance_prompt_ids[0]])
        was_training = self.model.training
        self.model.eval()
        try:
            for quarter in range(4):
                t = torch.tensor([(2 * quarter + 1) * self.T // 8], device=device)
                out = self.tensors.denoising.predict(self.model, noise, t, cond)
                if not bool(torch.isfinite(out).all()):
                    return False
        finally:
            self.model.train(was_training)
        return True

    def _diverged(self, what: str, keep_current: bool = True):
        """Stop: keep (or write, when the current state is still finite and ``keep_current``) the last good
        checkpoint and say which."""
        where = None
        if keep_current and self._finite() and self.step > 0:
            where = self.save_checkpoint()
        elif self.main:
            where = latest_checkpoint(self.out)
        kept = (f"the last good checkpoint is {where} (a resume repeats this run's settings): lower "
                "--learning_rate and start over with --force" if where
                else "no good checkpoint exists: lower --learning_rate and start again")
        raise TuneQDMError(f"{what}; stopped, {kept}")

    @torch.no_grad()
    def validate(self):
        """``--num_validation_images`` images of ``--validation_prompt`` into ``validation/step-<step>/``."""
        if not self.main:
            return
        cfg = self.cfg
        model = self.model
        model.eval()
        try:
            pipe = self.pipe
            if pipe is None:
                pipe = assemble(self.source, model, self.acc.device, text_encoders=cfg.encoders)
            pipeline_progress(pipe, f"validation at step {self.step}")
            images = generate(pipe, self.validation_prompt, cfg.num_validation_images, cfg.validation_inference_steps,
                              seed=cfg.seed, height=self.resolution, width=self.resolution)
            folder = self.out / "validation" / f"step-{self.step:06d}"
            try:
                with atomic_dir(folder) as tmp:
                    for i, image in enumerate(images):
                        image.save(tmp / f"{i:03d}.png")
                    (tmp / "prompt.txt").write_text(self.validation_prompt + "\n")
            except WRITE_ERRORS as e:
                raise self._write_failed(e, folder) from None
        finally:
            if self.pipe is None:
                pipe = None
                gc.collect()
            model.train()


def train(cfg: TrainConfig | None = None, callbacks=(), trainer: Trainer | None = None, **kwargs) -> Path:
    """Run one training; returns the output folder. ``train(TrainConfig(...))`` or ``train(instance_data_dir=...)``;
    ``trainer``: a ``Trainer`` of ``cfg`` to run (to read ``trainer.finished`` after)."""
    if cfg is None:
        cfg = TrainConfig(**kwargs)
    elif kwargs:
            cfg = replace(cfg, **kwargs)
    main = os.environ.get("RANK", "0") == "0"
    with warnings.catch_warnings(), quiet_while(cfg.quiet or not main), \
            output_lock(cfg.output_dir, "--output_dir") if main else contextlib.nullcontext():  # one run per folder
        warnings.simplefilter("always", TrainWarning)
        return (trainer or Trainer(cfg, callbacks)).setup().run()
