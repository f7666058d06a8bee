"""Hypnos (seed 000): foreground-focused DreamBooth for inanimate objects.

    L = lambda_r L_r + lambda_pp L_pp + lambda_p L_p + lambda_ld L_ld                                  (eq. 1)
    L_r  = sigma sqrt(2 pi) (E[exp(||eps_theta(z_i, t, c) - eps||^2 / 2 sigma^2)] - 1)                 (eq. 2)
    L_pp = E ||eps_theta(z_p, t, c) - eps||^2                                                           (eq. 4)
    L_p  = E ||C(x) - C(D(z0))||^2 while step <= s_p, else 0                                         (eq. 5, 6)
    L_ld = E ||1 - LD(z0)||^2                                                                           (eq. 7)

with lambda = (1, 1, 0.003, 0.5), sigma = 1.382 (the L2-closest sigma on [0, 1], eq. 3: `fit_sigma`), s_p = 500
of 800 steps, C = EfficientNet-B1 blocks 2/3/4 weighted 0.35/0.45/0.2 (app. B.1), D the frozen VAE decoder,
LD the latent discriminator pretrained by `pretrain-disc` (app. B.2) that keeps training against the
generator here. UNet and text encoder train (sec. 3.2); seed 42, 800 steps, 8-bit Adam where available (app. B).

||.||^2 is taken as the per-sample mean squared error (the paper's "mean squared error"; app. D: the loss
"rarely exceeds 1", which a sum over 16k latent elements would). z0 is the trainer's one-step estimate
(z_t - sqrt(1 - a_t) eps_theta) / sqrt(a_t) of the instance samples. The equations themselves are pure functions
in `subjectops.training.losses`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from subjectops.config_base import StrictModel, TrainSteps, template
from subjectops.errors import SubjectopsError
from subjectops.methods.base import LATENT_DISCRIMINATOR, Batch, Phase, TrainExample, WeightNeed
from subjectops.methods.dreambooth import DreamBoothMethod

if TYPE_CHECKING:
    import torch

DISC_SUBDIR = "latent_discriminator"


# Hypnos (seed 000): monotone background colours for the content-centric refinement (sec. 3.3).
HYPNOS_COLORS = {
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "red": (220, 30, 30),
    "green": (40, 170, 60), "blue": (30, 70, 210), "yellow": (245, 215, 40), "orange": (245, 140, 30),
    "purple": (130, 50, 170), "pink": (240, 130, 180), "brown": (120, 75, 40), "cyan": (40, 200, 220),
}


class HypnosAugmentCfg(StrictModel):
    """Seed 000 sec. 3.3: background replaced by a monotone colour with probability 0.66; a small portion
    of those also resized (Table 3: 2% of the 20% coloured-background reals = 10%)."""

    replace_background: float = Field(0.66, ge=0, le=1)
    resize: float = Field(0.1, ge=0, le=1)  # fraction of replaced-background samples whose subject is rescaled
    resize_scale: tuple[float, float] = (0.5, 0.85)  # subject scale range of a resized sample
    variants_per_image: int = Field(10, ge=1, le=200)  # pre-augmented pool per image (latents are cached)
    colors: dict[str, tuple[int, int, int]] = HYPNOS_COLORS

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.resize_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"resize_scale {self.resize_scale} must satisfy 0 < low <= high <= 1")
        if len(self.colors) < 2:
            raise ValueError("colors needs at least two entries (masked foregrounds use a second colour)")
        for name, rgb in self.colors.items():
            if not name.strip() or any(not 0 <= c <= 255 for c in rgb):
                raise ValueError(f"color {name!r}: {rgb} must be a non-empty name with RGB values in 0-255")
        return self


# Method.format_prompt's placeholders and the background clause (sec. 3.3).
HypnosPrompt = template("token", "placeholder", "class_word", "background")


class HypnosCfg(StrictModel):
    """Seed 000 (Hypnos): L = l_r L_r + l_pp L_pp + l_p L_p + l_ld L_ld (eq. 1); app. B: 800 steps, seed 42."""

    steps: TrainSteps = 800
    lr: float = Field(2e-6, gt=0)  # not stated by the paper; its DreamBooth baselines use 1e-6 and 2e-6
    train_text_encoder: bool = True  # sec. 3.2: the denoiser and the text encoder are optimised, the VAE frozen
    use_8bit_adam: Literal["auto", True, False] = "auto"  # app. B; auto = when bitsandbytes and CUDA are present
    # sec. 3.3: two clauses, foreground then background; {background} = a colour name or background_token
    instance_prompt: HypnosPrompt = "a photo of {token} {class_word}, {background} background"
    background_token: str = Field("zwx", pattern=r"^\S+$")  # the second rare word: "original background"
    lambda_r: float = Field(1.0, ge=0)
    lambda_pp: float = Field(1.0, ge=0)
    lambda_p: float = Field(0.003, ge=0)
    lambda_ld: float = Field(0.5, ge=0)
    reconstruction_loss: Literal["inverse-gaussian", "mse"] = "inverse-gaussian"  # eq. 2 (mse: DreamBooth's)
    sigma: float = Field(1.382, gt=0)  # eq. 2/3: the L2-closest sigma on [0, 1]
    perceptual_steps: int = Field(500, ge=0)  # s_p (eq. 6)
    perceptual_blocks: list[int] = [2, 3, 4]  # EfficientNet-B1 MBConv stages (torchvision features[i])
    perceptual_block_weights: list[float] = [0.35, 0.45, 0.2]  # app. B.1
    # auto: a small random EfficientNet when model.base is a tiny preset, else torchvision's B1 weight file in
    # the torch hub cache; a path to a .pth/.safetensors file (or a directory holding one); or tiny
    efficientnet: str = "auto"
    disc_lr: float = Field(1e-5, gt=0)  # the discriminator keeps training against the generator (sec. 3.4)
    train_discriminator: bool = True
    # Ablations (fig. 12): each switches one loss term of eq. 1 off.
    reconstruction: bool = True
    prior_preservation: bool = True
    perceptual: bool = True
    latent_discriminator: bool = True
    augment: HypnosAugmentCfg = HypnosAugmentCfg()

    @model_validator(mode="after")
    def _check(self):
        if len(self.perceptual_blocks) != len(self.perceptual_block_weights):
            raise ValueError(f"perceptual_blocks {self.perceptual_blocks} and perceptual_block_weights "
                             f"{self.perceptual_block_weights} must have the same length")
        if any(not 1 <= b <= 8 for b in self.perceptual_blocks):
            raise ValueError(f"perceptual_blocks {self.perceptual_blocks}: EfficientNet blocks are 1-8")
        if "{background}" not in self.instance_prompt:
            raise ValueError("instance_prompt needs a {background} clause (sec. 3.3)")
        return self


class HypnosMethod(DreamBoothMethod):
    """DreamBooth's parameters, saving and inference (UNet + text encoder); Hypnos' data and losses."""

    name = "hypnos"
    config_key = "hypnos"
    config_model = HypnosCfg

    def __init__(self, params, class_word, models):
        super().__init__(params, class_word, models)
        self.disc_dir: Path | None = None  # the pretrained discriminator (`receive`), read by setup()
        self.disc = None  # the raw module: saved, checkpointed, and (with detached weights) the generator's critic
        self.disc_opt = None
        self.disc_train = None  # what the adversarial update calls: the accelerate-prepared module (DDP) once prepared
        self._backward = lambda loss: loss.backward()
        self.perceptual = None

    # --- prompts (sec. 3.3): foreground clause, then background clause --------------------------------
    def prompt_for(self, background: str | None) -> str:
        return self.cfg.instance_prompt.format(token=self.identifier(), placeholder=self.identifier(),
                                               class_word=self.class_word,
                                               background=background or self.cfg.background_token)

    def instance_prompt(self) -> str:
        return self.prompt_for(None)

    # --- which terms run -------------------------------------------------------------------------------
    def _uses_disc(self) -> bool:
        return self.cfg.latent_discriminator and self.cfg.lambda_ld > 0

    def _uses_perceptual(self) -> bool:
        return self.cfg.perceptual and self.cfg.lambda_p > 0 and self.cfg.perceptual_steps > 0

    def _uses_priors(self) -> bool:
        return self.cfg.prior_preservation and self.cfg.lambda_pp > 0

    def _offline_preset(self) -> bool:
        """A tiny or world base model: `efficientnet: auto` takes the tiny random network. The world has no
        ImageNet-trained EfficientNet-B1, so on world-sd15 the perceptual term measures nothing (recorded)."""
        from subjectops.models.loading import is_tiny, is_world

        return is_tiny(self.params.model) or is_world(self.params.model)

    def requirements(self) -> set[str]:
        return super().requirements() | ({LATENT_DISCRIMINATOR} if self._uses_disc() else set())

    def receive(self, provided: dict[str, Path]) -> None:
        self.disc_dir = provided.get(LATENT_DISCRIMINATOR)

    def real_image_augment(self) -> HypnosAugmentCfg:
        return self.cfg.augment

    def required_weights(self) -> list[WeightNeed]:
        if not self._uses_perceptual() or self.cfg.efficientnet == "tiny" or self._offline_preset():
            return []
        from subjectops.models.perceptual import _weight_file, how_to_provide

        ident = self.cfg.efficientnet
        return [WeightNeed("EfficientNet-B1 (Hypnos perceptual loss)", ident, lambda: _weight_file(ident),
                           how_to_provide(), key="finetune.hypnos.efficientnet")]

    def setup(self) -> None:
        cfg = self.cfg
        if not any([cfg.reconstruction and cfg.lambda_r > 0, self._uses_priors(), self._uses_perceptual(),
                    self._uses_disc()]):
            raise SubjectopsError("every Hypnos loss term is switched off (finetune.hypnos)",
                                  fix="keep at least one of reconstruction, prior_preservation, perceptual, "
                                      "latent_discriminator true with a weight above 0")
        device = self.models.unet.device
        if self._uses_disc():
            from subjectops.models.latent_discriminator import LatentDiscriminator

            if self.disc_dir is None:
                raise SubjectopsError(
                    "Hypnos needs the pretrained latent discriminator (eq. 7) but no pretrain-disc directory was "
                    "given",
                    fix="run `subjectops pretrain-disc --refine RUN/refine --priors RUN/priors --out "
                        "RUN/pretrain_disc` and pass --disc RUN/pretrain_disc "
                        "(or --set finetune.hypnos.latent_discriminator=false)")
            self.disc = LatentDiscriminator.load(Path(self.disc_dir)).to(device)
            channels = self.models.vae.config.latent_channels
            if self.disc.config["latent_channels"] != channels:
                raise SubjectopsError(
                    f"the latent discriminator in {self.disc_dir} takes {self.disc.config['latent_channels']}-channel "
                    f"latents but this VAE makes {channels}",
                    fix="run `subjectops pretrain-disc` again with the same --model as finetune")
            # The discriminator's weights keep requires_grad=True (DDP registers them once); the generator's term
            # reads LD through detached weights (`_critic_scores`), so it never sends gradients into LD.
            import torch

            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr,
                                              betas=(self.params.finetune.adam_beta1, self.params.finetune.adam_beta2))
            self.disc_train = self.disc
        if self._uses_perceptual():
            from subjectops.models.perceptual import PerceptualEncoder, load_efficientnet

            net, info = load_efficientnet(cfg.efficientnet, tiny=self._offline_preset())
            self.perceptual = PerceptualEncoder(net, cfg.perceptual_blocks, cfg.perceptual_block_weights,
                                                info).to(device)

    def phases(self) -> list[Phase]:
        return [Phase("hypnos", self.cfg.steps, self.cfg.lr, self._named, text_changes=self._train_text(),
                      uses_priors=self._uses_priors(), use_8bit_adam=self.cfg.use_8bit_adam)]

    def examples(self, images, masks, priors):
        # The trainer encodes each TrainExample once and caches its VAE latent distribution (training/data.py), so
        # the content-centric augmentation of sec. 3.3 cannot be redrawn every step. Instead each photo yields
        # a seeded pool of `variants_per_image` pre-augmented copies at the configured proportions; the trainer
        # draws that pool uniformly, so every training sample is background-replaced with probability ~0.66.
        from subjectops.data.augment import content_centric_variants

        variants = content_centric_variants(images, masks, self.cfg.augment, seed=self.params.finetune.seed)
        # The trainer moves the diffusion models to its device after setup(); follow them here, before a
        # resumed checkpoint loads the discriminator's optimizer state (which then lands on the same device).
        device = self.models.unet.device if self.models is not None else None
        for module in (self.disc, self.perceptual):
            if module is not None and device is not None:
                module.to(device)
        instance = [TrainExample(v.pixels, self.prompt_for(v.background), v.mask) for v in variants]
        prior = [TrainExample(p, self.class_prompt(), None, is_prior=True)
                 for p in priors] if self._uses_priors() else []
        return instance, prior

    # --- the loss (eq. 1) ------------------------------------------------------------------------------
    def loss(self, batch: Batch, step: int, phase: Phase):
        from subjectops.training import losses

        cfg = self.cfg
        d = self.denoise(batch)
        per_sample = losses.per_sample_mse(d.pred, d.target)
        inst = (~batch.is_prior).to(per_sample.device)
        total = per_sample.new_zeros(())
        terms: dict[str, float] = {}
        if cfg.reconstruction and cfg.lambda_r > 0:
            if cfg.reconstruction_loss == "inverse-gaussian":
                l_r = losses.reconstruction_loss(per_sample[inst], cfg.sigma)  # eq. 2
            else:
                l_r = self.weighted_mean(per_sample[inst], d.timesteps[inst])  # DreamBooth's MSE (ablation)
            total = total + cfg.lambda_r * l_r
            terms["loss_reconstruction"] = l_r.detach()
        prior = batch.is_prior.to(per_sample.device)
        if self._uses_priors() and prior.any():
            l_pp = per_sample[prior].mean()  # eq. 4: plain MSE on class latents
            total = total + cfg.lambda_pp * l_pp
            terms["loss_prior"] = l_pp.detach()
        run_p = self._uses_perceptual() and losses.perceptual_active(step, cfg.perceptual_steps)
        run_ld = self._uses_disc()
        if run_p or run_ld:
            z0 = losses.predict_x0(self.models.schedule, d.noisy[inst], d.pred[inst], d.timesteps[inst])
        if run_p:
            vae = self.models.vae
            decoded = vae.decode(self.models.vae_unscale(z0).to(vae.dtype)).sample  # D(z0), eq. 5
            l_p = self.perceptual.loss(batch.pixels[inst].to(decoded), decoded).mean()
            total = total + cfg.lambda_p * l_p
            terms["loss_perceptual"] = l_p.detach()
        if run_ld:
            if cfg.train_discriminator:
                terms["loss_discriminator"] = self._discriminator_step(batch.latents[inst], z0.detach())
            scores = self._critic_scores(z0.float())
            l_ld = losses.latent_discriminator_loss(scores)  # eq. 7
            total = total + cfg.lambda_ld * l_ld
            terms["loss_latent_disc"] = l_ld.detach()
            terms["ld_score"] = float(scores.detach().mean())
        return total, terms

    def _critic_scores(self, z0: torch.Tensor) -> torch.Tensor:
        """LD(z0) with the discriminator's current weights detached: gradients reach z0 (the generator), not LD."""
        from torch.func import functional_call

        from subjectops.models.latent_discriminator import scores_from_logits

        weights = {k: v.detach() for k, v in self.disc.named_parameters()}
        return scores_from_logits(functional_call(self.disc, weights, (z0,)))

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One adversarial update of LD (sec. 3.4): instance latents real, the generator's z0 fake. It runs
        before the generator term reads LD, so that term sees the updated weights. Through the accelerator:
        DDP averages LD's gradients across processes, and under fp16 the loss is scaled like the generator's."""
        import torch

        from subjectops.models.latent_discriminator import bce_from_logits

        z = torch.cat([real.float(), fake.float()])
        labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(z.device)
        loss = bce_from_logits(self.disc_train(z), labels)
        self._backward(loss)
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)
        return loss.detach()

    def prepare_modules(self, accelerator) -> list[torch.nn.Module]:
        if self.disc is None or not self.cfg.train_discriminator:
            return []
        self.disc_train, self.disc_opt = accelerator.prepare(self.disc, self.disc_opt)
        self._backward = accelerator.backward
        return [self.disc_train]

    # --- state and artifacts ------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        if self.disc is None:
            return {}
        return {"disc": {k: v.detach().cpu().clone() for k, v in self.disc.state_dict().items()},
                "disc_opt": self.disc_opt.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.disc is not None and state.get("disc") is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    def save(self, out_dir: Path, snapshot: bool = False) -> list[str]:
        written = super().save(out_dir, snapshot)
        if self.disc is not None:
            self.disc.save(Path(out_dir) / DISC_SUBDIR, finetuned_from=str(self.disc_dir))
            written.append(DISC_SUBDIR)
        return written
