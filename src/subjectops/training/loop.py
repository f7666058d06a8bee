"""The one training loop every method runs on, using accelerate as it is meant to be used.

Per phase, the modules whose parameters train, the optimizer and the LR scheduler go through
`accelerator.prepare`: data parallelism (DDP averages the gradients), mixed precision (autocast, and under fp16
the gradient scaler that scales the loss, unscales before clipping, skips a step whose gradients overflowed and
lowers the scale) and gradient accumulation (`accelerator.accumulate`) are accelerate's, not ours. A method's own
trainable modules (Hypnos' discriminator) are prepared by the method through the same accelerator.

Trainable weights stay in float32 under mixed precision; modules that never train run in the mixed-precision
dtype, as diffusers' training scripts do.

All randomness (batch choice, latent sampling, noise, timesteps) comes from one torch.Generator per process that
is checkpointed with the weights, optimizer, LR scheduler and gradient scaler, so a resumed run matches an
uninterrupted one.

SIGTERM (what Kubernetes sends a preempted pod, `terminationGracePeriodSeconds` before SIGKILL) lets the step in
progress finish, writes a checkpoint of it and ends finetune with `Preempted` (exit code EXIT_PREEMPTED = 75,
sysexits' EX_TEMPFAIL): the bound is one optimizer step plus one checkpoint write. Running the same command
again, or a retried pipeline task, resumes from that checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers.optimization import get_scheduler

from subjectops.console import console, counted_columns
from subjectops.console import progress as progress_display
from subjectops.errors import SubjectopsError
from subjectops.stopping import EXIT_STOPPED, Stopped, sigterm_requests_stop
from subjectops.training.checkpoints import StepLog, checkpoint_dirs, load_checkpoint, save_checkpoint
from subjectops.training.contract import OptimizerSettings, Phase
from subjectops.training.data import BatchMaker, ExampleSet
from subjectops.training.models import DiffusionModels
from subjectops.training.resume_check import check_resume_state

if TYPE_CHECKING:
    from subjectops.config import Params
    from subjectops.methods.base import Method

# The config sections a finetune reads: a checkpoint resumes only under the same values.
TRAINING_SECTIONS = ("model", "subject", "priors", "finetune")
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXIT_PREEMPTED = EXIT_STOPPED  # sysexits EX_TEMPFAIL: "try again later"; the CLI exits with it on SIGTERM


class Preempted(Stopped):
    """finetune stopped on SIGTERM after writing a checkpoint; running it again resumes."""


@dataclass
class PhaseRun:
    """One phase as it trains: its parameters, the model modules holding them (`owners`) and what the accelerator
    wrapped them in, the method's own prepared modules, the optimizer and LR schedule, and the step records whose
    loss terms are still tensors on the device."""

    phase: Phase
    index: int
    params: list[torch.nn.Parameter]
    owners: list[torch.nn.Module]
    wrapped: list[torch.nn.Module]
    owned: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_sched: object
    pending: list[dict] = field(default_factory=list)

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [*self.wrapped, *self.owned]


class Trainer:
    """Runs a method's phases. `cache_latents` / `cache_text` exist for the benchmark's reference loop;
    `accelerator` lets a test or benchmark hand in one it configured (e.g. a CPU gradient scaler).
    `on_snapshot(step)` is called on the main process after each step in `snapshot_steps`, with the live weights
    of that step (the caller saves them).

    `data` is the content identity of what trains (hashes of the refined subject, the priors, the class word):
    a checkpoint made for other data is refused, never resumed. `ckpt_dir` is where checkpoints live (default
    `work_dir/checkpoints`; the Kubeflow component puts them on the model-cache volume, keyed by run)."""

    def __init__(self, params: Params, models: DiffusionModels, method: Method, resolution: int, work_dir: Path,
                 cache_latents: bool = True, cache_text: bool = True,
                 on_step: Callable[[int, dict], None] | None = None, show_progress: bool = True,
                 accelerator: Accelerator | None = None,
                 on_snapshot: Callable[[int], None] | None = None, snapshot_steps: Iterable[int] = (),
                 data: dict[str, str | None] | None = None, ckpt_dir: Path | None = None):
        self.params = params
        self.cfg = params.finetune
        self.models = models
        self.method = method
        self.resolution = resolution
        self.work_dir = Path(work_dir)
        self.data = dict(data or {})
        self._ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else self.work_dir / "checkpoints"
        self.on_step = on_step
        self.on_snapshot = on_snapshot
        self.snapshot_steps = frozenset(snapshot_steps)
        self.show_progress = show_progress
        if accelerator is None:
            if self.cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
                # accelerate silently trains in float32 when fp16 is asked for on a CPU: say so instead.
                raise SubjectopsError("finetune.mixed_precision = 'fp16' needs a CUDA GPU; none is available",
                                      fix="use --set finetune.mixed_precision=bf16 or =no on a CPU")
            accelerator = Accelerator(mixed_precision=self.cfg.mixed_precision,
                                      gradient_accumulation_steps=self.cfg.gradient_accumulation_steps,
                                      cpu=not torch.cuda.is_available())
        self.accelerator = accelerator
        self.device = accelerator.device
        # Data parallel under `accelerate launch --num_processes N`: each process draws its own batches and
        # noise (rank 0 draws exactly what a single-process run draws).
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.generator = torch.Generator().manual_seed(self.cfg.seed + self.rank)
        self.batches = BatchMaker(models, self.generator, self.device, resolution, self.cfg.batch_size,
                                  self.cfg.center_flip, cache_latents, cache_text)
        for module in [models.unet, models.vae, *models.text_encoders]:
            module.to(self.device)
        if self.cfg.gradient_checkpointing:
            # Recompute activations in the backward pass: less memory, about a third more compute.
            models.unet.enable_gradient_checkpointing()
            for encoder in models.text_encoders:
                encoder.activation_checkpointing_enable()
        if self.cfg.compile:
            # In place (nn.Module.compile): the module, its parameters and state-dict keys stay as they are, so
            # preparing, checkpoints and saving see the same UNet; the first step pays the compile.
            models.unet.compile()
        models.unet.train()
        self.log = StepLog(self.work_dir / "train_log.jsonl")
        # AdamW's fused kernel reads and writes each weight and its moments once per step (small-sd15's UNet on
        # this CPU: ~4x faster than foreach, bench/step_profile.py), the same update up to float rounding
        # (tests/test_performance.py). Under fp16's gradient scaler, foreach: the scaler hands a fused kernel the
        # overflow flag to skip the step itself, and accelerate then never reports the step as skipped.
        self.fused_adamw = accelerator.scaler is None
        # What accelerate wrapped each trained module in (DistributedDataParallel under several processes),
        # recorded in the finetune manifest.
        self.prepared: dict[str, str] = {}

    @property
    def log_path(self) -> Path:
        return self.log.path

    @property
    def ckpt_dir(self) -> Path:
        return self._ckpt_dir

    # --- precision and optimizer ---------------------------------------------------------------------------
    def _cast_for_mixed_precision(self, phases: list[Phase]) -> None:
        """Modules that never train run in the mixed-precision dtype; a module with trainable parameters stays
        float32, so the optimizer updates float32 weights (fp16 weights would round small updates away)."""
        dtype = MIXED_PRECISION_DTYPES[self.cfg.mixed_precision]
        if dtype == torch.float32:
            return
        trained = {id(p) for phase in phases for _, p in phase.trainable()}
        for module in [self.models.vae, *self.models.trainable_candidates]:
            if not any(id(p) in trained for p in module.parameters()):
                module.to(dtype)

    def _optimizer(self, params: list[torch.nn.Parameter], lr: float, use_8bit_adam: bool | str | None = None,
                   settings: OptimizerSettings | None = None) -> torch.optim.Optimizer:
        """Adam over `params` with the phase's settings (`Method.optimizer_settings`; finetune's when None)."""
        settings = settings or OptimizerSettings.from_finetune(self.cfg)
        kwargs = dict(lr=lr, betas=settings.betas, weight_decay=settings.weight_decay, eps=settings.eps)
        eight_bit = self.cfg.use_8bit_adam if use_8bit_adam is None else use_8bit_adam
        if eight_bit == "auto":  # a method's choice (Phase.use_8bit_adam): only where it can run
            eight_bit = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
        if eight_bit:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise SubjectopsError("finetune.use_8bit_adam = true but bitsandbytes is not installed",
                                      fix="pip install bitsandbytes (CUDA), or --set finetune.use_8bit_adam=false",
                                      ) from None
            return bnb.optim.AdamW8bit(params, **kwargs)
        fused = self.fused_adamw
        return torch.optim.AdamW(params, fused=fused, foreach=not fused, **kwargs)

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _save_checkpoint(self, global_step: int, phase_idx: int, optimizer, lr_sched) -> None:
        scaler = self.accelerator.scaler
        state = {
            "global_step": global_step,
            "phase": phase_idx,
            "config": self.params.digest(TRAINING_SECTIONS),
            "data": self.data,
            "tensors": self.method.state_tensors(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_sched.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "generators": gather_object([self.generator.get_state()]),  # one per process, by rank
            "torch_rng": torch.get_rng_state(),
            "method": self.method.extra_state(),
        }
        if self.is_main:
            save_checkpoint(self.ckpt_dir, global_step, {**state, "log": self.log.read()})

    def latest_checkpoint(self, phases: list[Phase]) -> dict | None:
        """The newest checkpoint made with this run's training parameters, or None (a fresh start).

        Other parameters: the checkpoint is set aside and training starts fresh (a deliberate change of a
        hyperparameter). Other data (subject photos, priors, class word): refused, since that is another run's
        folder, and starting fresh would delete that run's checkpoints. A state that is not one this training
        produces (an edited state.json) is refused too (training/resume_check.py)."""
        found = checkpoint_dirs(self.ckpt_dir)
        if not found:
            return None
        state = load_checkpoint(found[-1])
        recorded = state.get("data", {})
        changed = sorted(k for k in set(recorded) | set(self.data) if recorded.get(k) != self.data.get(k))
        if changed:
            raise SubjectopsError(
                f"checkpoint {found[-1]} was made for other training data ({', '.join(changed)} differ): it belongs "
                "to another run, and resuming it would label that run's training with this subject",
                fix=f"use another --out for this subject, or delete {self.ckpt_dir} to discard that run's progress")
        if state.get("config") != self.params.digest(TRAINING_SECTIONS):
            console.print(f"[yellow]ignoring checkpoint {found[-1].name}: it was made with different parameters")
            return None
        check_resume_state(state, found[-1], phases, self.method.state_tensors())
        return state

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self, images: list[torch.Tensor], masks: list[torch.Tensor], priors: list[torch.Tensor],
              validate: Callable[[int], None] | None = None) -> int:
        method = self.method
        self.work_dir.mkdir(parents=True, exist_ok=True)
        phases = method.phases()
        self._cast_for_mixed_precision(phases)
        inst_examples, prior_examples = method.examples(images, masks, priors)
        inst = self.batches.example_set(inst_examples)
        prior = self.batches.example_set(prior_examples) if prior_examples else None

        resume = self.latest_checkpoint(phases)
        start_global = 0
        if resume:
            method.load_state_tensors(resume["tensors"])
            method.load_extra_state(resume["method"])
            self.generator.set_state(resume["generators"][self.rank])
            torch.set_rng_state(resume["torch_rng"])
            start_global = resume["global_step"]
            console.print(f"[green]resuming finetune from step {start_global}")
        elif self.is_main:  # a fresh start: drop any checkpoints made with other parameters
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        if self.is_main:
            self.log.open(resume["log"] if resume else [])

        total = sum(p.steps for p in phases)
        global_step = 0
        # a terminal gets the live bar; a file gets a line every finetune.log_every steps. The loss shows once read.
        progress = progress_display(*counted_columns("loss"), every=self.cfg.log_every,
                                    disable=not (self.show_progress and self.is_main))
        try:
            with progress, sigterm_requests_stop() as stop:
                task = progress.add_task(f"finetune {method.name}", total=total, completed=start_global, loss="")
                for phase_idx, phase in enumerate(phases):
                    phase_start = global_step
                    global_step += phase.steps
                    if start_global >= global_step:
                        continue  # phase finished before the checkpoint
                    self._run_phase(phase, phase_idx, phase_start, start_global, inst,
                                    prior if phase.uses_priors else None, resume, progress, task, validate, stop)
                    resume = None
        finally:
            self.log.close()
        return total

    def _run_phase(self, phase: Phase, phase_idx: int, phase_start: int, start_global: int, inst: ExampleSet,
                   prior: ExampleSet | None, resume: dict | None, progress, task, validate,
                   stop: threading.Event) -> None:
        run = self._start_phase(phase, phase_idx, resume)
        text_cache = None
        if self.batches.cache_text and not phase.text_changes:
            prompts = set(inst.prompts) | (set(prior.prompts) if prior else set())
            text_cache = self.batches.text_cache(prompts)

        def publish() -> None:
            self._publish(run, progress, task)

        with self.models.calling_through(dict(zip(run.owners, run.wrapped))):
            for global_step in range(max(start_global, phase_start) + 1, phase_start + phase.steps + 1):
                terms = self._step(phase, global_step, inst, prior, text_cache, run.params, run.optimizer,
                                   run.lr_sched, run.modules)
                record = {"step": global_step, "phase": phase.name, "lr": run.lr_sched.get_last_lr()[0], **terms}
                if run.optimizer.step_was_skipped:
                    record["skipped"] = True  # fp16: the gradients overflowed; the scaler lowered its scale
                run.pending.append(record)
                self._after_step(run, global_step, publish, validate, stop)
            publish()
        for module in run.modules:
            self.accelerator.unwrap_model(module, keep_fp32_wrapper=False)  # restores each raw module's forward
        for p in run.params:
            p.requires_grad_(False)

    def _start_phase(self, phase: Phase, phase_idx: int, resume: dict | None) -> PhaseRun:
        """The phase's parameters set to train, their modules, optimizer (the method's settings for the phase) and
        LR schedule prepared by the accelerator, and their state restored when the run resumes inside the phase."""
        acc = self.accelerator
        params = [p for _, p in phase.trainable()]
        for p in params:
            p.requires_grad_(True)
        owners = [m for m in self.models.trainable_candidates if any(p.requires_grad for p in m.parameters())]
        optimizer = self._optimizer(params, phase.lr, phase.use_8bit_adam, self.method.optimizer_settings(phase))
        # accelerate steps a prepared scheduler once per process per optimizer step (its schedules count
        # per-process batches), so the schedule is stated in those units, as diffusers' scripts do.
        lr_sched = get_scheduler("constant_with_warmup", optimizer,
                                 num_warmup_steps=self.cfg.lr_warmup_steps * self.world,
                                 num_training_steps=phase.steps * self.world)
        *wrapped, optimizer, lr_sched = acc.prepare(*owners, optimizer, lr_sched)
        owned = self.method.prepare_modules(acc)
        self.prepared.update({type(acc.unwrap_model(w)).__name__: type(w).__name__ for w in [*wrapped, *owned]})
        if resume and resume["phase"] == phase_idx:
            optimizer.load_state_dict(resume["optimizer"])
            lr_sched.load_state_dict(resume["lr_scheduler"])
            if acc.scaler is not None and resume["grad_scaler"] is not None:
                acc.scaler.load_state_dict(resume["grad_scaler"])
        return PhaseRun(phase, phase_idx, params, owners, wrapped, owned, optimizer, lr_sched)

    def _publish(self, run: PhaseRun, progress, task) -> None:
        """Reads the pending records' loss terms in one host transfer, then logs them in order."""
        for record in _read_terms(run.pending):
            if not math.isfinite(record["loss"]):
                raise SubjectopsError(f"loss became {record['loss']} at step {record['step']} ({run.phase.name})",
                                      fix="lower the learning rate or use --set finetune.mixed_precision=no")
            if self.is_main:
                self.log.write(record)
            if self.on_step:
                self.on_step(record["step"], record)
            progress.update(task, advance=1, loss=f"loss {record['loss']:.4f}")
        run.pending.clear()

    def _after_step(self, run: PhaseRun, global_step: int, publish: Callable[[], None], validate,
                    stop: threading.Event) -> None:
        """What follows an optimizer step: the log, a checkpoint, a snapshot, a validation image, a stop."""
        checkpoint = bool(self.cfg.checkpoint_every and global_step % self.cfg.checkpoint_every == 0)
        snapshot = bool(self.on_snapshot and self.is_main and global_step in self.snapshot_steps)
        validation = bool(validate and self.is_main and self.cfg.validation_every
                          and global_step % self.cfg.validation_every == 0)
        stopping = self._stop_requested(stop)
        # The log (and the non-finite check) trails the step by under finetune.log_every steps, and is complete
        # before anything is saved from these weights (a checkpoint carries the log); a per-step callback sees each
        # step as it ends (the live weights of that step).
        if len(run.pending) >= self.cfg.log_every or self.on_step or checkpoint or snapshot or validation or stopping:
            publish()
        if checkpoint or stopping:
            self._save_checkpoint(global_step, run.index, run.optimizer, run.lr_sched)
        # this step's snapshot and validation image before a stop: the resumed run starts after this step
        if snapshot:
            self.on_snapshot(global_step)
        if validation:
            validate(global_step)
        if stopping:
            raise Preempted(f"finetune stopped by SIGTERM after step {global_step}; checkpoint "
                            f"{self.ckpt_dir / f'step_{global_step:06d}'} written",
                            fix="run the same command again (same --out, params and inputs): it resumes "
                                f"from step {global_step}; a retried pipeline task does so by itself")

    def _stop_requested(self, stop: threading.Event) -> bool:
        """Whether any process got SIGTERM: under several processes all of them stop at the same step, since
        writing a checkpoint gathers the generators of every process."""
        if self.world == 1:
            return stop.is_set()
        return any(gather_object([stop.is_set()]))

    def _step(self, phase: Phase, global_step: int, inst: ExampleSet, prior: ExampleSet | None, text_cache,
              params, optimizer, lr_sched, modules) -> dict[str, torch.Tensor | float]:
        """One optimizer step: `gradient_accumulation_steps` micro-batches under `accelerator.accumulate`."""
        acc = self.accelerator
        accum = self.cfg.gradient_accumulation_steps
        max_grad_norm = self.method.optimizer_settings(phase).max_grad_norm
        terms_sum: dict[str, torch.Tensor | float] = {}
        for _ in range(accum):
            with acc.accumulate(*modules):
                batch = self.batches.make(inst, prior, text_cache)
                with acc.autocast():
                    loss, terms = self.method.loss(batch, global_step, phase)
                acc.backward(loss)  # divides by the accumulation steps; scales the loss under fp16
                if acc.sync_gradients and max_grad_norm:
                    acc.clip_grad_norm_(params, max_grad_norm)  # unscales first under fp16
                optimizer.step()  # a no-op until the last micro-batch; skipped on overflow under fp16
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": loss.detach(), **terms}.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v / accum
        self.method.after_optimizer_step(phase)
        return terms_sum


def _read_terms(records: list[dict]) -> list[dict]:
    """The records with every tensor value replaced by its float, read from the device in one transfer (a
    per-step `float(loss)` would make the host wait for each step's kernels before queueing the next)."""
    slots = [(r, k) for r in records for k, v in r.items() if isinstance(v, torch.Tensor)]
    if slots:
        values = torch.stack([r[k].float().reshape(()) for r, k in slots]).tolist()
        for (r, k), value in zip(slots, values):
            r[k] = value
    return records


def replicas_in_sync(trainer: Trainer) -> bool:
    """Every process must end with the same weights (the method's own modules included, e.g. Hypnos'
    discriminator): a mismatch means gradients were not averaged."""
    h = hashlib.sha256()

    def update(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            h.update(key.encode())
            h.update(value.detach().float().cpu().numpy().tobytes())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                update(f"{key}.{k}", value[k])

    update("weights", trainer.method.state_tensors())
    update("method", trainer.method.extra_state())
    return len(set(gather_object([h.hexdigest()]))) == 1
