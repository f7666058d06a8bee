"""The one training loop every method runs on (accelerate), and the diffusion-loss helpers methods compose.

Costs paid once instead of every step:
- VAE latent distributions (mean, std) are cached per training image; each step samples
  z = mean + std * eps with the run's generator. `vae.encode(x).latent_dist.sample(generator)` draws eps
  the same way, so the two are the same computation, not an approximation (bench/train_step.py checks it).
- Prompt embeddings are cached per phase when nothing in the text path trains.

All randomness (batch choice, latent sampling, noise, timesteps) comes from one torch.Generator that is
checkpointed with the weights, optimizer and LR scheduler, so a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from subjectops.config import Params
from subjectops.errors import SubjectopsError
from subjectops.methods.base import Batch, Conditioning, Method, Phase, TrainExample

console = Console(stderr=True)
# The config sections a finetune reads: a checkpoint resumes only under the same values.
TRAINING_SECTIONS = ("model", "subject", "priors", "finetune")


@dataclass
class DiffusionModels:
    """The pieces of a text-to-image pipeline that training touches."""

    pipe: object
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: DDPMScheduler
    is_sdxl: bool

    @classmethod
    def from_pipeline(cls, pipe) -> "DiffusionModels":
        encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        for m in [pipe.unet, pipe.vae, *encoders]:
            m.requires_grad_(False)
        return cls(
            pipe=pipe,
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            is_sdxl=len(encoders) == 2,
        )

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def encode_prompts(self, prompts: list[str], resolution: int) -> Conditioning:
        """Prompt embeddings as the pipelines compute them (SD: last hidden state; SDXL: penultimate of both
        encoders concatenated, pooled projection and size/crop time ids)."""
        device = self.unet.device
        if not self.is_sdxl:
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            return Conditioning(self.text_encoder(ids)[0])
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(prompts),
                                dtype=hidden[0].dtype, device=device)
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})

    def vae_scale(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def vae_unscale(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return latents / self.vae.config.scaling_factor + shift


@dataclass
class Denoised:
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR(t), gamma) / SNR(t) for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


class Trainer:
    """Runs a method's phases. `cache_latents` / `cache_text` exist for the benchmark's reference loop."""

    def __init__(self, params: Params, models: DiffusionModels, method: Method, resolution: int, work_dir: Path,
                 cache_latents: bool = True, cache_text: bool = True,
                 on_step: Callable[[int, dict], None] | None = None, show_progress: bool = True):
        self.params = params
        self.cfg = params.finetune
        self.models = models
        self.method = method
        method.trainer = self
        self.resolution = resolution
        self.work_dir = Path(work_dir)
        self.cache_latents = cache_latents
        self.cache_text = cache_text
        self.on_step = on_step
        self.show_progress = show_progress
        if self.cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise SubjectopsError("finetune.mixed_precision = 'fp16' needs a CUDA GPU; none is available",
                                  fix="use --set finetune.mixed_precision=bf16 or =no on a CPU")
        self.accelerator = Accelerator(mixed_precision=self.cfg.mixed_precision, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        # Data parallel under `accelerate launch --num_processes N`: each process draws its own batches and
        # noise (rank 0 draws exactly what a single-process run draws); gradients are averaged every step.
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.generator = torch.Generator().manual_seed(self.cfg.seed + self.rank)
        for module in [models.unet, models.vae, *models.text_encoders]:
            module.to(self.device)
        if self.cfg.gradient_checkpointing:
            # Recompute activations in the backward pass: less memory, about a third more compute.
            models.unet.enable_gradient_checkpointing()
            for encoder in models.text_encoders:
                encoder.gradient_checkpointing_enable()
        models.unet.train()
        self.log_path = self.work_dir / "train_log.jsonl"

    # --- shared loss helpers for methods ----------------------------------------------------------
    def denoise(self, latents: torch.Tensor, cond: Conditioning, generator: torch.Generator) -> Denoised:
        """Forward diffusion at random timesteps, then the UNet's prediction and its target."""
        sched = self.models.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        if self.cfg.offset_noise:
            # Offset noise (Guttenberg 2023): a per-channel constant shift lets the model learn brightness.
            noise = noise + self.cfg.offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=generator).to(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        with self.accelerator.autocast():
            pred = self.models.unet(noisy, t, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs).sample
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = noise
        return Denoised(noise, t, noisy, pred.float(), target)

    def per_sample_mse(self, pred: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None) -> torch.Tensor:
        err = (pred.float() - target.float()) ** 2
        if weight_map is not None:
            err = err * weight_map
        return err.mean(dim=tuple(range(1, err.ndim)))

    def weighted_mean(self, per_sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.cfg.snr_gamma is None:
            return per_sample.mean()
        return (per_sample * min_snr_weights(self.models.noise_scheduler, timesteps, self.cfg.snr_gamma)).mean()

    def predict_x0(self, noisy: torch.Tensor, pred: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z0 estimate from z_t and the predicted noise: (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
        sched = self.models.noise_scheduler
        a = sched.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
        if sched.config.prediction_type == "v_prediction":
            return a.sqrt() * noisy - (1 - a).sqrt() * pred
        return (noisy - (1 - a).sqrt() * pred) / a.sqrt()

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Data parallel: every process steps with the mean gradient, so replicas stay identical."""
        if self.world > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # --- data --------------------------------------------------------------------------------------
    def _prepare_examples(self, examples: list[TrainExample]) -> dict:
        pixels = torch.stack([e.pixels for e in examples])
        if self.cfg.center_flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        masks = None
        if any(e.mask is not None for e in examples):
            masks = torch.stack([e.mask if e.mask is not None else torch.ones_like(e.pixels[:1]) for e in examples])
            if self.cfg.center_flip:
                masks = torch.cat([masks, masks.flip(-1)])
        data = {"pixels": pixels, "masks": masks, "prompts": [e.prompt for e in examples], "n": len(examples)}
        if self.cache_latents:
            data["mean"], data["std"] = self._latent_dist(pixels)
        return data

    @torch.no_grad()
    def _latent_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for chunk in pixels.split(8):
            dist = self.models.vae.encode(chunk.to(self.device, self.models.vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def _sample(self, data: dict, count: int) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        g = self.generator
        idx = torch.randint(0, data["n"], (count,), generator=g).tolist()
        if self.cfg.center_flip:
            flips = torch.randint(0, 2, (count,), generator=g).tolist()
            rows = [i + f * data["n"] for i, f in zip(idx, flips)]
        else:
            rows = idx
        pixels = data["pixels"][rows]
        if self.cache_latents:
            mean, std = data["mean"][rows], data["std"][rows]
            latents = mean + std * torch.randn(mean.shape, generator=g).to(mean)
        else:
            with torch.no_grad():
                dist = self.models.vae.encode(pixels.to(self.device, self.models.vae.dtype)).latent_dist
                latents = dist.sample(generator=g).float()
        masks = data["masks"][rows] if data["masks"] is not None else None
        return idx, pixels, self.models.vae_scale(latents), masks

    def _conditioning(self, prompts: list[str], cache: dict | None) -> Conditioning:
        if cache is None:
            return self.models.encode_prompts(prompts, self.resolution)
        return Conditioning.cat([cache[p] for p in prompts])

    @torch.no_grad()
    def _text_cache(self, prompts: set[str]) -> dict:
        return {p: self.models.encode_prompts([p], self.resolution) for p in sorted(prompts)}

    def make_batch(self, inst: dict, prior: dict | None, text_cache: dict | None) -> Batch:
        b = self.cfg.batch_size
        idx, pixels, latents, masks = self._sample(inst, b)
        prompts = [inst["prompts"][i] for i in idx]
        is_prior = [False] * b
        if prior is not None:
            pidx, ppix, plat, _ = self._sample(prior, b)
            prompts += [prior["prompts"][i] for i in pidx]
            pixels, latents = torch.cat([pixels, ppix]), torch.cat([latents, plat])
            if masks is not None:
                masks = torch.cat([masks, torch.ones_like(masks[:b])])
            is_prior += [True] * b
        cond = self._conditioning(prompts, text_cache)
        return Batch(latents.to(self.device), prompts, cond, torch.tensor(is_prior), pixels.to(self.device),
                     masks.to(self.device) if masks is not None else None, self.generator)

    # --- optimizer ----------------------------------------------------------------------------------
    def _optimizer(self, params: list[torch.nn.Parameter], lr: float,
                   use_8bit_adam: bool | str | None = None) -> torch.optim.Optimizer:
        kwargs = dict(lr=lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2), weight_decay=self.cfg.adam_weight_decay,
                      eps=self.cfg.adam_epsilon)
        eight_bit = self.cfg.use_8bit_adam if use_8bit_adam is None else use_8bit_adam
        if eight_bit == "auto":  # a method's choice (Phase.use_8bit_adam): only where it can run
            import importlib.util

            eight_bit = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
        if eight_bit:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise SubjectopsError("finetune.use_8bit_adam = true but bitsandbytes is not installed",
                                      fix="pip install bitsandbytes (CUDA), or --set finetune.use_8bit_adam=false") from None
            return bnb.optim.AdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    # --- checkpoints ------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    def _save_checkpoint(self, global_step: int, phase_idx: int, optimizer, lr_sched) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "global_step": global_step,
            "phase": phase_idx,
            "config": self.params.digest(TRAINING_SECTIONS),
            "tensors": {k: v.detach().cpu().clone() for k, v in self.method.state_tensors().items()},
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_sched.state_dict(),
            "generators": gather_object([self.generator.get_state()]),  # one per process, by rank
            "torch_rng": torch.get_rng_state(),
            "method": self.method.extra_state(),
        }
        if not self.is_main:
            return
        final = self.ckpt_dir / f"step_{global_step:06d}.pt"
        tmp = final.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, final)  # atomic: a kill mid-write never leaves a truncated checkpoint
        for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-2]:
            old.unlink()

    def latest_checkpoint(self) -> dict | None:
        files = sorted(self.ckpt_dir.glob("step_*.pt")) if self.ckpt_dir.exists() else []
        for f in reversed(files):
            state = torch.load(f, map_location="cpu", weights_only=False)
            if state["config"] == self.params.digest(TRAINING_SECTIONS):
                return state
            console.print(f"[yellow]ignoring checkpoint {f.name}: it was made with different parameters")
            return None
        return None

    # --- the loop ------------------------------------------------------------------------------------
    def train(self, images: list[torch.Tensor], masks: list[torch.Tensor], priors: list[torch.Tensor],
              validate: Callable[[int], None] | None = None) -> int:
        method = self.method
        self.work_dir.mkdir(parents=True, exist_ok=True)
        phases = method.phases()
        inst_examples, prior_examples = method.examples(images, masks, priors)
        inst = self._prepare_examples(inst_examples)
        prior = self._prepare_examples(prior_examples) if prior_examples else None

        resume = self.latest_checkpoint()
        start_global = 0
        if resume:
            method.load_state_tensors(resume["tensors"])
            method.load_extra_state(resume["method"])
            self.generator.set_state(resume["generators"][self.rank])
            torch.set_rng_state(resume["torch_rng"])
            start_global = resume["global_step"]
            console.print(f"[green]resuming finetune from step {start_global}")
        elif self.is_main:  # a fresh start: drop the log and any checkpoints made with other parameters
            self.log_path.unlink(missing_ok=True)
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)

        total = sum(p.steps for p in phases)
        global_step = 0
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), console=console, disable=not (self.show_progress and self.is_main))
        with progress, self.log_path.open("a") as log:
            task = progress.add_task(f"finetune {method.name}", total=total, completed=start_global, loss=float("nan"))
            for phase_idx, phase in enumerate(phases):
                phase_start = global_step
                global_step += phase.steps
                if start_global >= global_step:
                    continue  # phase finished before the checkpoint
                self._run_phase(phase, phase_idx, phase_start, start_global, inst,
                                prior if phase.uses_priors else None, resume, progress, task, log, validate)
                resume = None
        return total

    def _run_phase(self, phase: Phase, phase_idx: int, phase_start: int, start_global: int, inst: dict,
                   prior: dict | None, resume: dict | None, progress, task, log, validate) -> None:
        named = phase.trainable()
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        optimizer = self._optimizer(params, phase.lr, phase.use_8bit_adam)
        lr_sched = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=self.cfg.lr_warmup_steps,
                                 num_training_steps=phase.steps)
        if resume and resume["phase"] == phase_idx:
            optimizer.load_state_dict(resume["optimizer"])
            lr_sched.load_state_dict(resume["lr_scheduler"])
        text_cache = None
        if self.cache_text and not phase.text_changes:
            prompts = set(inst["prompts"]) | (set(prior["prompts"]) if prior else set())
            text_cache = self._text_cache(prompts)
        accum = self.cfg.gradient_accumulation_steps
        first = max(start_global, phase_start)
        for global_step in range(first + 1, phase_start + phase.steps + 1):
            terms_sum: dict[str, float] = {}
            for _ in range(accum):
                batch = self.make_batch(inst, prior, text_cache)
                loss, terms = self.method.loss(batch, global_step, phase)
                self.accelerator.backward(loss / accum)
                for k, v in {"loss": float(loss.detach()), **terms}.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v / accum
            self.average_gradients(params)
            if self.cfg.max_grad_norm:
                self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            self.method.after_optimizer_step(phase)
            if not math.isfinite(terms_sum["loss"]):
                raise SubjectopsError(f"loss became {terms_sum['loss']} at step {global_step} ({phase.name})",
                                      fix="lower the learning rate or use --set finetune.mixed_precision=no")
            record = {"step": global_step, "phase": phase.name, "lr": lr_sched.get_last_lr()[0], **terms_sum}
            if self.is_main:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if self.on_step:
                self.on_step(global_step, record)
            progress.update(task, advance=1, loss=terms_sum["loss"])
            if self.cfg.checkpoint_every and global_step % self.cfg.checkpoint_every == 0:
                self._save_checkpoint(global_step, phase_idx, optimizer, lr_sched)
            if validate and self.is_main and self.cfg.validation_every and global_step % self.cfg.validation_every == 0:
                validate(global_step)
        for p in params:
            p.requires_grad_(False)


def replicas_in_sync(trainer: "Trainer") -> bool:
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


def default_resolution(models: DiffusionModels) -> int:
    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    return models.unet.config.sample_size * scale
