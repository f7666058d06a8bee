"""pretrain-disc: pretrain Hypnos' latent discriminator (seed 000 app. B.2, fig. 3a, Table 3).

600 steps on a sampler that draws the eight image types of Table 3 (real: instance 30%, coloured background
18%, coloured background + resize 2%; fake: class images 17.5%, negative-colour foreground 9.75%, masked
foreground 3.25%, coloured background + negative foreground 4.88%, coloured background + masked foreground
14.63%), VAE-encoded with the base model's frozen VAE. A share of the class images is held out; after
training, fresh draws from another seed over those held-out class images measure held-out accuracy.

Output: `latent_discriminator.safetensors` + `latent_discriminator.json` (architecture, latent size),
`metrics.json` (held-out accuracy, per type), `train_log.jsonl`, `manifest.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from subjectops.config import Params
from subjectops.console import console
from subjectops.console import progress as progress_display
from subjectops.errors import ModelNotFoundError, SubjectopsError
from subjectops.methods.base import LATENT_DISCRIMINATOR
from subjectops.stages.base import Stage
from subjectops.stages.common import planned_inputs, stage_output, write_manifest
from subjectops.stages.priors import load_priors
from subjectops.stopping import stop_if_requested

if TYPE_CHECKING:
    import torch

    from subjectops.data.augment import DiscriminatorSampler
    from subjectops.models.latent_discriminator import LatentDiscriminator


def load_vae(model_cfg):
    """The base model's VAE alone (the same weights `load_pipeline` would give), frozen."""
    from diffusers import AutoencoderKL

    from subjectops.models.loading import how_to_provide, offline, resolve

    source = resolve(model_cfg)
    kwargs = dict(subfolder="vae", revision=model_cfg.revision, cache_dir=model_cfg.cache_dir, use_safetensors=True)
    if offline() and not Path(source).exists():
        kwargs["local_files_only"] = True
    try:
        vae = AutoencoderKL.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load the VAE of '{source}' ({exc.__class__.__name__})",
                                 fix=how_to_provide(source)) from None
    vae.requires_grad_(False)
    return vae.eval()


class LatentEncoder:
    """pixels in [-1, 1] -> scaled VAE latents (the space the UNet and finetune's z0 live in).

    The posterior mean, not a sample: for a trained VAE the two differ by a posterior std of about 1e-2 of
    the signal; for a random (tiny) VAE the sampling noise would swamp the image (std ~1 vs ~0.3).
    """

    def __init__(self, vae, device: torch.device):
        self.vae, self.device = vae.to(device), device
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    @property
    def factor(self) -> int:
        from subjectops.models.loading import vae_scale_factor

        return vae_scale_factor(self.vae.config)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
            return (dist.mean.float() - self.shift) * self.scale


class LatentPool:
    """Encoded images of every Table 3 type; a draw picks types with the sampler's proportions, then one
    cached latent of each type.

    VAE encoding is the costly part of a discriminator step (one encode per image); encoding a seeded pool
    once, as finetune caches its latents, costs the same as ~`variants_per_type / batch_size` steps. Instance
    and class types hold every image once; the augmented types hold `variants_per_type` random variants.
    """

    def __init__(self, sampler: DiscriminatorSampler, encode: LatentEncoder, variants_per_type: int,
                 batch_size: int = 32):
        import torch

        from subjectops.data.augment import IMAGE_TYPES

        self.sampler = sampler
        self.latents: dict[str, torch.Tensor] = {}
        for kind, p in zip(IMAGE_TYPES, sampler.probs.tolist()):
            if p <= 0:
                continue
            if kind == "instance":
                pixels = sampler.images
            elif kind == "class_image":
                pixels = sampler.class_images
            else:
                pixels = [sampler.make(kind) for _ in range(variants_per_type)]
            self.latents[kind] = torch.cat([encode(torch.stack(pixels[i:i + batch_size]))
                                            for i in range(0, len(pixels), batch_size)])

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        import torch

        from subjectops.data.augment import REAL_TYPES

        g = self.sampler.generator
        kinds = self.sampler.draw_types(n)
        z = torch.stack([self.latents[k][int(torch.randint(0, len(self.latents[k]), (1,), generator=g))]
                         for k in kinds])
        labels = torch.tensor([1.0 if k in REAL_TYPES else 0.0 for k in kinds])
        return z, labels, kinds


def evaluate_disc(disc: LatentDiscriminator, pool: LatentPool, n: int, batch_size: int = 64) -> dict:
    """Accuracy (LD(z) > 0.5 means real) overall, on reals, on fakes and per image type."""
    import torch

    from subjectops.data.augment import IMAGE_TYPES, REAL_TYPES

    disc.eval()
    hits: dict[str, list[int]] = {t: [0, 0] for t in IMAGE_TYPES}
    for start in range(0, n, batch_size):
        z, labels, kinds = pool.draw(min(batch_size, n - start))
        with torch.no_grad():
            pred = (disc.score(z).cpu() > 0.5).float()
        for k, ok in zip(kinds, (pred == labels).tolist()):
            hits[k][0] += int(ok)
            hits[k][1] += 1
    disc.train()
    total = sum(c for c, _ in hits.values()), sum(m for _, m in hits.values())
    real = [hits[t] for t in IMAGE_TYPES if t in REAL_TYPES]
    fake = [hits[t] for t in IMAGE_TYPES if t not in REAL_TYPES]
    def acc(pairs):
        return (sum(c for c, _ in pairs) / max(1, sum(m for _, m in pairs)))
    return {"accuracy": total[0] / max(1, total[1]), "samples": total[1], "accuracy_real": acc(real),
            "accuracy_fake": acc(fake),
            "per_type": {t: {"accuracy": c / m, "samples": m} for t, (c, m) in hits.items() if m}}


def pretrain_disc(params: Params, refine_dir: Path, priors_dir: Path | None, out: Path) -> Path:
    import torch

    from subjectops.data.augment import DiscriminatorSampler
    from subjectops.data.subject import RefinedSubject, to_tensor
    from subjectops.methods import configured_method
    from subjectops.models.latent_discriminator import LatentDiscriminator

    cfg = params.pretrain_disc
    inputs = planned_inputs(params, "pretrain_disc", {"refine": refine_dir, "priors": priors_dir})
    refine_dir, priors_dir = inputs["refine"], inputs["priors"]
    subject = RefinedSubject.load(refine_dir)
    class_images = load_priors(priors_dir)
    proportions, notes = table3_proportions(cfg, class_images)
    n_held = round(len(class_images) * cfg.heldout_class_fraction) if len(class_images) > 1 else 0
    train_class, held_class = class_images[n_held:], class_images[:n_held] or class_images

    images = [to_tensor(i) for i in subject.images()]
    masks = [to_tensor(m) for m in subject.masks()]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encode = LatentEncoder(load_vae(params.model), device)
    if subject.resolution % encode.factor:
        raise SubjectopsError(f"subject resolution {subject.resolution} is not a multiple of the VAE's scale factor",
                              fix="set subject.resolution to a multiple of 8 and run refine again")
    latent_size = subject.resolution // encode.factor
    torch.manual_seed(cfg.seed)
    disc = LatentDiscriminator(latent_channels=encode.vae.config.latent_channels, latent_size=latent_size,
                               **cfg.model.model_dump()).to(device)
    augment = configured_method(params).real_image_augment()  # the procedure fine-tuning uses (app. B.2)
    g = torch.Generator().manual_seed(cfg.seed)
    pool = LatentPool(DiscriminatorSampler(images, masks, train_class, proportions, augment, g), encode,
                      cfg.variants_per_type)

    with stage_output(out) as work:
        train_disc(disc, pool, cfg, device, work / "train_log.jsonl")
        metrics: dict = {"steps": cfg.steps, "proportions": proportions, "class_images_train": len(train_class),
                         "class_images_heldout": len(held_class) if n_held else 0, "notes": notes}
        if cfg.eval_samples:
            # Held out: class images never trained on, and fresh colours/resizes/variants from another seed.
            g_eval = torch.Generator().manual_seed(cfg.seed + 1)
            held = LatentPool(DiscriminatorSampler(images, masks, held_class, proportions, augment, g_eval), encode,
                              cfg.variants_per_type)
            metrics["heldout"] = evaluate_disc(disc, held, cfg.eval_samples)
            console.print(f"pretrain-disc: held-out accuracy {metrics['heldout']['accuracy']:.3f} "
                          f"over {metrics['heldout']['samples']} draws")
        disc.save(work, pretrained_steps=cfg.steps, model_base=params.model.base, resolution=subject.resolution)
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_manifest(work, "pretrain_disc", params, {"refine": Path(refine_dir), "priors": priors_dir},
                       heldout_accuracy=metrics.get("heldout", {}).get("accuracy"), notes=notes)
    return Path(out)


def table3_proportions(cfg, class_images: list) -> tuple[dict[str, float], list[str]]:
    """Table 3's image-type proportions (`cfg`: params.pretrain_disc), and the notes on what was changed."""
    proportions = cfg.proportions.model_dump()
    notes = []
    if not class_images and proportions["class_image"] > 0:
        # Happens when prior preservation is ablated and `priors` is not planned: Table 3's class share is
        # dropped and the other seven renormalized; the manifest records it.
        note = ("no class images (priors did not run or made none): Table 3's class_image share is dropped "
                "and the other types renormalized")
        console.print(f"[yellow]pretrain-disc: {note}")
        notes.append(note)
        proportions["class_image"] = 0.0
    return proportions, notes


def train_disc(disc: LatentDiscriminator, pool: LatentPool, cfg, device, log_path: Path) -> None:
    """`cfg.steps` AdamW steps of binary cross-entropy (real vs fake) on batches drawn from `pool`, one log line
    each."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    with progress_display(transient=True, every=max(1, cfg.steps // 20)) as progress, log_path.open("w") as log:
        task = progress.add_task("pretrain-disc", total=cfg.steps)
        for step in range(1, cfg.steps + 1):
            z, labels, kinds = pool.draw(cfg.batch_size)
            z, labels = z.to(device), labels.to(device)
            logits = disc(z)
            loss = F.binary_cross_entropy_with_logits(logits, labels.view(-1, 1).expand_as(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = float(((torch.sigmoid(logits.detach()).mean(1) > 0.5).float() == labels).float().mean())
            log.write(json.dumps({"step": step, "loss": float(loss.detach()), "batch_accuracy": acc}) + "\n")
            progress.advance(task)
            stop_if_requested("pretrain-disc", f"after step {step} of {cfg.steps}")


STAGE = Stage(
    name="pretrain_disc",
    help="Pretrain Hypnos' latent discriminator on the Table 3 image types (seed 000 app. B.2).",
    run=lambda ctx: pretrain_disc(ctx.params, ctx.inputs["refine"], ctx.inputs.get("priors"), ctx.out),
    reads=("refine", "priors"),
    brought_by=LATENT_DISCRIMINATOR,
    absent_because="method {method} uses no latent discriminator",
    params=("model", "pretrain_disc", "finetune.hypnos"),
    code=("src/subjectops/models/latent_discriminator.py",),
    gpu=True,
    artifact="Model",
    flag="disc",
)
