"""`subjectops world build`: the miniature world's models, trained from scratch by the project's own code.

Parts, in order (each saved with a done-marker, so a stopped build resumes at the part it was in; the
UNets also checkpoint inside their loop):
  data       world images with ground truth (train, validation, held-out combinations) and instance views
  vae        AutoencoderKL (4x down: 64 px -> 16x16x4 latents)
  tokenizer  the project's CLIP-format BPE, trained on the world's words
  clip-gen   the generator's CLIP: its text tower becomes the pipeline's frozen text encoder (as in SD)
  judge      ground-truth classifiers + mask head (world accuracy, FID features, LPIPS backbone)
  clip       the metric CLIP (another seed and architecture than clip-gen): CLIP-I, CLIP-T
  dino       the DINO-role ViT (multi-view instance discrimination)
  sd15       UNet of world-sd15 (CFG caption dropout, EMA), assembled into a diffusers pipeline
  sd15-restart  more training of that UNet, from its EMA weights (`unet_restart_steps`; 0 skips it)
  sdxl       UNet of world-sdxl (SDXL's two encoders and added conditioning), warm-started from world-sd15's
             UNet where shapes match, assembled into a diffusers pipeline
  checks     every model measured with the final judge and encoders (world/checks.py), for the manifest
The shipped folder holds the pipelines and encoders in fp16 safetensors and `manifest.json` (SHA-256 of
every file, the command, the seed, wall time and measurements per part).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from subjectops.digest import sha256_file
from subjectops.world import nets, train
from subjectops.world.checks import (
    clip_retrieval,
    dino_auc,
    generated_accuracy,
    instance_views,
    judge_accuracy,
    vae_roundtrip,
)
from subjectops.world.sample import full_caption, render_batch
from subjectops.world.vocab import CLASSES, COLORS, PATTERNS, SCENES

PARTS = ("data", "vae", "tokenizer", "clip-gen", "judge", "sd15", "sd15-restart", "clip", "dino", "sdxl", "checks")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)
# Seed ranges: shipped and evaluation subjects never train the DINO-role encoder.
DINO_TRAIN_SUBJECTS = 1_000_000
DINO_EVAL_SUBJECTS = 2_000_000
VALIDATION_STREAM = 50_000_000
JUDGE_STREAM = 60_000_000


@dataclass
class BuildConfig:
    seed: int = 0
    n_train: int = 48_000
    n_val: int = 1_000
    n_heldout: int = 1_000
    vae_steps: int = 2500
    vae_batch: int = 32
    clip_steps: int = 1500
    clip_batch: int = 128
    judge_steps: int = 600
    judge_batch: int = 64
    n_judge: int = 16_000  # images of any combination (held-out ones included) for the judge
    dino_instances: int = 2000
    dino_views: int = 4
    dino_steps: int = 1000
    dino_batch: int = 64
    unet_steps: int = 7000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    # A warm restart of world-sd15's UNet (the project's choice, after SGDR, Loshchilov & Hutter 2017): from the
    # sd15 part's EMA weights, a fresh AdamW and cosine over these steps, the EMA continuing from those weights.
    # Measured (docs/world.md): the first 5,000-step sd15 is undertrained; 4,000 restart steps raised its judged
    # class accuracy from 55% to 69% on 256 validation captions.
    unet_restart_steps: int = 0
    unet_restart_lr: float = 3e-4
    sdxl_steps: int = 1500
    checkpoint_every: int = 1000
    sample_every: int = 1000
    sample_steps: int = 25  # DDIM steps of the judged samples (during the UNets' training and in `checks`)
    workers: int = 2

    def set(self, item: str) -> None:
        """`key=value` for one setting, typed as the setting is."""
        from subjectops.config import ConfigError

        key, _, value = item.partition("=")
        if key not in self.__dataclass_fields__ or not value:
            raise ConfigError(f"world build setting {item!r} is not KEY=VALUE with a known key",
                              fix=f"use one of {', '.join(self.__dataclass_fields__)}")
        kind = type(getattr(self, key))
        try:
            setattr(self, key, kind(value))
        except ValueError:
            raise ConfigError(f"world build setting {key}={value!r} is not a {kind.__name__}",
                              fix=f"give {key} a {kind.__name__}") from None

    @classmethod
    def smoke(cls) -> BuildConfig:
        """A few steps of every part (the test of the build)."""
        return cls(n_train=256, n_val=64, n_heldout=64, n_judge=64, vae_steps=4, vae_batch=8, clip_steps=4,
                   clip_batch=16, judge_steps=4, judge_batch=16, dino_instances=16, dino_views=2, dino_steps=3,
                   dino_batch=8, unet_steps=6, unet_batch=4, unet_restart_steps=3, sdxl_steps=4, checkpoint_every=3,
                   sample_every=0, sample_steps=2, workers=1)


class Build:
    def __init__(self, work: Path, cfg: BuildConfig, log: Callable[[str], None] = print):
        self.work, self.cfg, self.log = Path(work), cfg, log
        self.work.mkdir(parents=True, exist_ok=True)
        self._data: dict[str, Any] = {}

    # -- bookkeeping ---------------------------------------------------------------------------------
    def part_dir(self, part: str) -> Path:
        return self.work / part

    def done(self, part: str) -> bool:
        return (self.part_dir(part) / "done.json").exists()

    def finish(self, part: str, started: float, **measured: Any) -> None:
        record = {"part": part, "wall_seconds": round(time.time() - started, 1), "config": asdict(self.cfg),
                  **measured}
        (self.part_dir(part) / "done.json").write_text(json.dumps(record, indent=1))
        self.log(f"[world build] {part}: done in {record['wall_seconds']} s {json.dumps(measured)}")

    def progress(self, part: str, total: int) -> train.Progress:
        start, every, first = time.time(), max(1, total // 20), []

        def report(step: int, loss: float) -> None:
            first.append(step) if not first else None  # a resumed loop starts past 0
            if (step + 1) % every == 0 or step + 1 == total:
                rate = (step + 1 - first[0]) / max(1e-9, time.time() - start)
                eta = (total - step - 1) / max(rate, 1e-9)
                self.log(f"[world build] {part} step {step + 1}/{total} loss {loss:.4f} "
                         f"({rate:.2f} steps/s, eta {eta / 60:.1f} min)")
        return report

    def record_invocation(self, command: str) -> None:
        with (self.work / "history.jsonl").open("a") as f:
            f.write(json.dumps({"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "config": asdict(self.cfg)}) + "\n")

    def run(self, parts: tuple[str, ...] = PARTS) -> None:
        torch.manual_seed(self.cfg.seed)
        for part in parts:
            if self.done(part):
                self.log(f"[world build] {part}: already built, kept")
                continue
            self.part_dir(part).mkdir(parents=True, exist_ok=True)
            getattr(self, "build_" + part.replace("-", "_"))()

    # -- data ----------------------------------------------------------------------------------------
    def build_data(self) -> None:
        t0, cfg, out = time.time(), self.cfg, self.part_dir("data")
        for name, start, count, kind in (("train", 0, cfg.n_train, "train"),
                                         ("val", VALIDATION_STREAM, cfg.n_val, "train"),
                                         ("heldout", 0, cfg.n_heldout, "heldout")):
            b = render_batch(start, count, kind, workers=cfg.workers)
            np.save(out / f"{name}_images.npy", b.images)
            np.save(out / f"{name}_masks.npy", b.masks)
            np.save(out / f"{name}_labels.npy", b.labels)
            (out / f"{name}_captions.json").write_text(json.dumps(b.captions))
            full = [full_caption(t).text() for t in b.truths]
            (out / f"{name}_full_captions.json").write_text(json.dumps(full))
        views = instance_views(DINO_TRAIN_SUBJECTS, cfg.dino_instances, cfg.dino_views)
        np.save(out / "instance_views.npy", views)
        self.finish("data", t0, n_train=cfg.n_train, n_val=cfg.n_val, n_heldout=cfg.n_heldout,
                    instances=cfg.dino_instances)

    def data(self, name: str) -> dict[str, Any]:
        if name not in self._data:
            d = self.part_dir("data")
            self._data[name] = {
                "images": np.load(d / f"{name}_images.npy"), "masks": np.load(d / f"{name}_masks.npy"),
                "labels": np.load(d / f"{name}_labels.npy"),
                "captions": json.loads((d / f"{name}_captions.json").read_text()),
                "full_captions": json.loads((d / f"{name}_full_captions.json").read_text()),
            }
        return self._data[name]

    # -- vae -----------------------------------------------------------------------------------------
    def build_vae(self) -> None:
        t0, cfg = time.time(), self.cfg
        vae = nets.vae()
        train.train_vae(vae, self.data("train")["images"], cfg.vae_steps, cfg.vae_batch, 1e-3, cfg.seed,
                        self.progress("vae", cfg.vae_steps))
        val = self.data("val")["images"]
        mean, std = train.encode_latents(vae, val)
        z = mean.float() + std.float() * torch.randn_like(mean.float())
        # SD's scaling factor makes the latents unit-variance (0.18215 for SD 1.x); ours, measured the same way
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        with torch.no_grad():
            rec = vae.decode(mean[:256].float()).sample.clamp(-1, 1)
        x = train.as_float(val, np.arange(min(256, len(val)))) * 2 - 1
        psnr = float(10 * torch.log10(4.0 / ((rec - x) ** 2).mean()))
        vae.save_pretrained(self.part_dir("vae") / "model")
        self.finish("vae", t0, scaling_factor=vae.config.scaling_factor, val_psnr_db=round(psnr, 2))

    def vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.part_dir("vae") / "model").eval()

    # -- tokenizer -----------------------------------------------------------------------------------
    def build_tokenizer(self) -> None:
        from subjectops.models.tokenizer import train_clip_bpe

        t0 = time.time()
        words = " ".join([*CLASSES, *COLORS, *PATTERNS, *SCENES, "picture", "photo", "subject"])
        train_clip_bpe(self.part_dir("tokenizer") / "files", extra_text=(words + "\n") * 20)
        self.finish("tokenizer", t0, vocab=len(self.tokenizer()))

    def tokenizer(self):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(self.part_dir("tokenizer") / "files", model_max_length=77)

    def token_ids(self, captions: list[str], length: int = 32) -> torch.Tensor:
        return self.tokenizer()(captions, padding="max_length", max_length=length, truncation=True,
                                return_tensors="pt").input_ids

    # -- the CLIPs -----------------------------------------------------------------------------------
    def _train_clip(self, part: str, kind: str, seed: int) -> None:
        from transformers import CLIPImageProcessor, CLIPModel

        t0, cfg = time.time(), self.cfg
        tok = self.tokenizer()
        torch.manual_seed(seed)
        model = CLIPModel(nets.clip_config(len(tok), kind))
        d = self.data("train")
        # half the pairs with the full caption: retrieval is scored on full captions
        captions = d["captions"] + d["full_captions"]
        uniq = sorted(set(captions))
        index = {c: i for i, c in enumerate(uniq)}
        caption_index = np.array([index[c] for c in captions])
        images = d["images"]
        pair_images = np.concatenate([images, images])
        train.train_clip(model, pair_images, self.token_ids(uniq), caption_index, cfg.clip_steps, cfg.clip_batch,
                         5e-4, seed, self.progress(part, cfg.clip_steps), CLIP_MEAN, CLIP_STD)
        folder = self.part_dir(part) / "model"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, do_center_crop=True,
                           resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(folder)
        self.finish(part, t0, retrieval_top1_of_10=clip_retrieval(folder, self.data("val"), seed))

    def build_clip_gen(self) -> None:
        self._train_clip("clip-gen", "generator", self.cfg.seed + 11)

    def build_clip(self) -> None:
        self._train_clip("clip", "metric", self.cfg.seed + 23)

    # -- judge ---------------------------------------------------------------------------------------
    def build_judge(self) -> None:
        from subjectops.world.judge import WorldJudge

        t0, cfg = time.time(), self.cfg
        torch.manual_seed(cfg.seed + 31)
        judge = WorldJudge()
        d = self.data("train")
        extra = render_batch(JUDGE_STREAM, cfg.n_judge, "any", workers=cfg.workers)
        train.train_judge(judge, np.concatenate([d["images"], extra.images]),
                          np.concatenate([d["labels"], extra.labels]), np.concatenate([d["masks"], extra.masks]),
                          cfg.judge_steps, cfg.judge_batch, 2e-3, cfg.seed, self.progress("judge", cfg.judge_steps))
        judge.save(self.part_dir("judge") / "model")
        judge = WorldJudge.load(self.part_dir("judge") / "model")
        measured = {k: judge_accuracy(judge, self.data(k)) for k in ("val", "heldout")}
        # the ceiling a generated image meets: the judge on the world VAE's reconstructions
        measured["val_vae_roundtrip"] = judge_accuracy(judge, vae_roundtrip(self.vae(), self.data("val")))
        self.finish("judge", t0, **measured)

    # -- DINO role -----------------------------------------------------------------------------------
    def build_dino(self) -> None:
        from transformers import ViTImageProcessor, ViTModel

        t0, cfg = time.time(), self.cfg
        torch.manual_seed(cfg.seed + 41)
        vit = ViTModel(nets.dino_config(), add_pooling_layer=False)
        head = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
        views = np.load(self.part_dir("data") / "instance_views.npy")
        train.train_instance_encoder(vit, head, views, cfg.dino_steps, min(cfg.dino_batch, len(views)), 5e-4,
                                     cfg.seed, self.progress("dino", cfg.dino_steps), DINO_MEAN, DINO_STD)
        folder = self.part_dir("dino") / "model"
        vit.save_pretrained(folder)
        ViTImageProcessor(size={"height": 64, "width": 64}, resample=3, image_mean=list(DINO_MEAN),
                          image_std=list(DINO_STD)).save_pretrained(folder)
        n_eval = 40 if cfg.dino_instances < 100 else 200
        self.finish("dino", t0, same_vs_other_subject_auc=dino_auc(folder, DINO_EVAL_SUBJECTS, n_eval))

    # -- the UNets -----------------------------------------------------------------------------------
    def pipeline(self, kind: str, unet=None):
        pipe = self._pipeline(kind, unet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _pipeline(self, kind: str, unet=None):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        clip_dir = self.part_dir("clip-gen") / "model"
        tok = self.tokenizer()
        if kind == "sd15":
            return StableDiffusionPipeline(
                vae=self.vae(), text_encoder=CLIPTextModel.from_pretrained(clip_dir).eval(), tokenizer=tok,
                unet=unet if unet is not None else nets.unet_sd15(), scheduler=nets.scheduler(),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        # SDXL's two text encoders: here both are the generator CLIP's text tower, the second with its
        # projection (SDXL pairs two different CLIPs; the world has one generator CLIP)
        return StableDiffusionXLPipeline(
            vae=self.vae(), text_encoder=CLIPTextModel.from_pretrained(clip_dir).eval(),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(clip_dir).eval(), tokenizer=tok,
            tokenizer_2=tok, unet=unet if unet is not None else nets.unet_sdxl(), scheduler=nets.scheduler(),
            force_zeros_for_empty_prompt=True)

    @torch.no_grad()
    def encode_captions(self, pipe, captions: list[str], kind: str) -> dict[str, torch.Tensor]:
        """The conditioning exactly as the pipeline computes it at inference (its own encode_prompt)."""
        states, pooled = [], []
        for i in range(0, len(captions), 256):
            chunk = captions[i:i + 256]
            if kind == "sd15":
                s, _ = pipe.encode_prompt(chunk, "cpu", 1, False)
            else:
                s, _, p, _ = pipe.encode_prompt(chunk, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
                pooled.append(p.half())
            states.append(s.half())
        out = {"states": torch.cat(states)}
        if pooled:
            out["pooled"] = torch.cat(pooled)
        return out

    def sd15_pipeline_dir(self) -> Path:
        """world-sd15: the restarted UNet's pipeline when the build restarted it, else the sd15 part's."""
        restarted = self.part_dir("sd15-restart") / "pipeline"
        return restarted if restarted.exists() else self.part_dir("sd15") / "pipeline"

    def _build_unet(self, part: str, kind: str, steps: int, lr: float, seed: int, init: Path | None = None,
                    restart: bool = False) -> None:
        """`init`: a UNet folder to start from where names and shapes match; `restart`: it is this UNet, trained
        already (no EMA decay warm-up)."""
        from safetensors.torch import load_file, save_file

        t0, cfg, folder = time.time(), self.cfg, self.part_dir(part)
        pipe = self.pipeline(kind)
        unet = pipe.unet
        if init is not None:
            warm_start(unet, init)
        d = self.data("train")
        latents = train.encode_latents(pipe.vae, d["images"])
        uniq = sorted(set(d["captions"]))
        index = {c: i for i, c in enumerate(uniq)}
        caption_index = np.array([index[c] for c in d["captions"]])
        cond = self.encode_captions(pipe, uniq, kind)
        if kind == "sd15":
            uncond = self.encode_captions(pipe, [""], kind)
            added = None
        else:  # force_zeros_for_empty_prompt: SDXL's unconditional branch is all zeros
            uncond = {k: torch.zeros_like(v[:1]) for k, v in cond.items()}
            time_ids = torch.tensor([[nets.SIZE, nets.SIZE, 0, 0, nets.SIZE, nets.SIZE]], dtype=torch.float32)

            def added(c):
                return {"added_cond_kwargs": {"text_embeds": c["pooled"],
                                              "time_ids": time_ids.expand(len(c["pooled"]), 6)}}
        ema = train.Ema(unet, 0.999, warm_up=not restart)
        start, opt_state = 0, None
        ckpt = folder / "checkpoint"
        if (ckpt / "state.json").exists():
            state = json.loads((ckpt / "state.json").read_text())
            start = state["step"]
            unet.load_state_dict(load_file(ckpt / "unet.safetensors"))
            ema_t = load_file(ckpt / "ema.safetensors")
            ema.params = [ema_t[str(i)] for i in range(len(ema.params))]
            opt_state = unflatten_optimizer(load_file(ckpt / "optimizer.safetensors"), state["optimizer"])
            # the part's wall time counts the stopped runs up to their last checkpoint (what came after it is redone)
            t0 -= state["wall_seconds"]
            self.log(f"[world build] {part}: resuming at step {start}")
        def on_step(step: int, opt) -> None:
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
                ckpt.mkdir(exist_ok=True)
                save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, ckpt / "unet.safetensors")
                save_file({str(i): p for i, p in enumerate(ema.params)}, ckpt / "ema.safetensors")
                tensors, meta = flatten_optimizer(opt.state_dict())
                save_file(tensors, ckpt / "optimizer.safetensors")
                (ckpt / "state.json").write_text(json.dumps({"step": step, "optimizer": meta,
                                                             "wall_seconds": round(time.time() - t0, 1)}))
            if cfg.sample_every and step % cfg.sample_every == 0:
                self.sample_report(part, pipe, ema, step)

        train.train_unet(unet, pipe.scheduler, latents, pipe.vae.config.scaling_factor, cond, caption_index, uncond,
                         steps, cfg.unet_batch, lr, seed, self.progress(part, steps), ema, start=start,
                         opt_state=opt_state, on_step=on_step, added=added)
        ema.copy_to(unet)
        pipe.save_pretrained(folder / "pipeline", safe_serialization=True)
        measured = self.sample_report(part, pipe, None, steps, n=64 if cfg.sample_every else 8)
        shutil.rmtree(ckpt, ignore_errors=True)
        self.finish(part, t0, steps=steps, batch=cfg.unet_batch, **measured)

    def build_sd15(self) -> None:
        self._build_unet("sd15", "sd15", self.cfg.unet_steps, self.cfg.unet_lr, self.cfg.seed)

    def build_sd15_restart(self) -> None:
        if not self.cfg.unet_restart_steps:
            self.finish("sd15-restart", time.time(), steps=0)
            return
        # its own sampling stream (seed + 1): the restart does not replay the first run's batches
        self._build_unet("sd15-restart", "sd15", self.cfg.unet_restart_steps, self.cfg.unet_restart_lr,
                         self.cfg.seed + 1, init=self.part_dir("sd15") / "pipeline" / "unet", restart=True)

    def build_sdxl(self) -> None:
        self._build_unet("sdxl", "sdxl", self.cfg.sdxl_steps, self.cfg.unet_lr, self.cfg.seed,
                         init=self.sd15_pipeline_dir() / "unet")

    def build_checks(self) -> None:
        """The pipelines' generated accuracy (validation and held-out captions) with the final judge."""
        from diffusers import DiffusionPipeline

        from subjectops.world.judge import WorldJudge

        t0, n = time.time(), 64 if self.cfg.sample_every else 8
        judge = WorldJudge.load(self.part_dir("judge") / "model")
        measured: dict[str, Any] = {"judge": {k: judge_accuracy(judge, self.data(k)) for k in ("val", "heldout")}}
        for kind, folder in (("sd15", self.sd15_pipeline_dir()), ("sdxl", self.part_dir("sdxl") / "pipeline")):
            pipe = DiffusionPipeline.from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            for name in ("val", "heldout"):
                d = self.data(name)
                measured[f"{kind}_{name}"], _ = generated_accuracy(
                    pipe, judge, d["full_captions"][:n], d["labels"][:n], steps=self.cfg.sample_steps)
        self.finish("checks", t0, **measured)

    @torch.no_grad()
    def sample_report(self, part: str, pipe, ema, step: int, n: int = 32) -> dict[str, float]:
        """Samples of validation and held-out captions, scored by the judge; a grid saved to look at."""
        from PIL import Image

        from subjectops.world.judge import WorldJudge

        backup = None
        if ema is not None:
            backup = [p.detach().clone() for p in pipe.unet.parameters()]
            ema.copy_to(pipe.unet)
        judge = WorldJudge.load(self.part_dir("judge") / "model")
        measured = {}
        for name in ("val", "heldout"):
            d = self.data(name)
            acc, images = generated_accuracy(pipe, judge, d["full_captions"][:n], d["labels"][:n],
                                             steps=self.cfg.sample_steps)
            measured.update({f"{name}_{k}": v for k, v in acc.items()})
            grid = (images[:32] * 255).round().astype(np.uint8)
            rows = [np.concatenate(list(grid[r * 8:(r + 1) * 8]), 1) for r in range(len(grid) // 8)]
            if rows:
                Image.fromarray(np.concatenate(rows, 0)).save(self.part_dir(part) / f"samples_{name}_{step:06d}.png")
        if backup is not None:
            for p, b in zip(pipe.unet.parameters(), backup):
                p.copy_(b)
        pipe.unet.train(ema is not None)
        self.log(f"[world build] {part} samples at step {step}: {json.dumps(measured)}")
        return measured


# ---------------------------------------------------------------------------------------------------
def warm_start(unet, source: Path) -> int:
    """Copy every tensor of another UNet whose name and shape match (the rest keeps its initialisation)."""
    from safetensors.torch import load_file

    files = sorted(Path(source).glob("*.safetensors"))
    theirs = load_file(files[0]) if files else {}
    mine = unet.state_dict()
    matched = {k: v.float() for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    unet.load_state_dict(matched, strict=False)
    return len(matched)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for pid, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                meta["scalars"][f"{pid}.{k}"] = float(v)
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = torch.tensor(v)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------------
# The shipped folder
# ---------------------------------------------------------------------------------------------------
SHIPPED = {"world-sdxl": ("sdxl", "pipeline"), "encoders/clip": ("clip", "model"), "encoders/dino": ("dino", "model"),
           "encoders/judge": ("judge", "model")}


def ship(build: Build, dest: Path, command: str) -> dict:
    """Copy the built models into `dest` in fp16 safetensors, with the manifest."""
    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    sources = {"world-sd15": build.sd15_pipeline_dir(),
               **{name: build.part_dir(part) / sub for name, (part, sub) in SHIPPED.items()}}
    for name, src in sources.items():
        shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("*.npy"))
        for f in (tmp / name).rglob("*.safetensors"):
            tensors = load_file(f)
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, f)
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    parts = {p: json.loads((build.part_dir(p) / "done.json").read_text()) for p in PARTS if build.done(p)}
    history = build.work / "history.jsonl"
    manifest = {
        "command": command, "seed": build.cfg.seed, "config": asdict(build.cfg), "parts": parts,
        # every invocation that built a part (a stopped build resumes with the settings of its new command)
        "history": [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else [],
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "provenance": "world-pretrained", "files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return manifest
