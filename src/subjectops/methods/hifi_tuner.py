"""HiFi Tuner (seed 001 sec. 3.2): textual inversion in the text encoder's *output* space.

The subject is c_s, n vectors that replace the last n rows of the encoded caption c (its padding part),
initialised from the same rows phi_s of the null-text encoding phi, so [c, c_s] = c before training.

    L_s(c_s) = || M . (eps_theta(x_t, [c, c_s]) - eps) ||^2 + w_s || c_s - phi_s ||^2        (eqs. 5, 6)

M is refine's subject mask, made by the configured backend (`refine.mask_backend`: GrabCut by default, SAM only with
a checkpoint), not by SAM as in the paper (sec. 3.2, fig. 2); reference-guided generation segments its first image
with the same backend.

The optimizer is the paper's (sec. 4: Adam, lr 5e-3): no weight decay and no gradient clipping
(`optimizer_settings`), not finetune's shared AdamW, whose decay would pull c_s toward 0 against eq. 6's pull toward
phi_s. Sampling defaults to reference-guided generation (`default_strategy`, what `infer.strategy: auto` means for
this method): the paper's headline rows (Tables 1-2) include it.

Phase "subject": one c_s for all timesteps (1000 Adam steps, lr 5e-3, sec. 4). Then alg. 1: walking the DDIM
timesteps from T down to 1, c_s^t starts from c_s^{t+1} and takes I steps on latents noised to exactly t: one
phase per timestep, so each starts a fresh optimizer on its own vector. Sampling uses c_s^t at step t (eq. 7;
`subjectops.inference.ddim.prompt_conditioning`). Saved as one safetensors tensor [T, n, d] with its timesteps.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pydantic import Field

from subjectops.config_base import InstancePrompt, StrictModel, TrainSteps
from subjectops.errors import SubjectopsError
from subjectops.methods.base import STEPWISE_SUBJECT_EMBEDDINGS, Batch, Method, OptimizerSettings, Phase

if TYPE_CHECKING:
    import torch

EMBEDS_FILE = "stepwise_embeds.safetensors"


class HiFiTunerCfg(StrictModel):
    steps: TrainSteps = 1000  # sec. 4: c_s for 1000 steps
    lr: float = Field(5e-3, gt=0)  # sec. 4: Adam, lr 5e-3 (also for alg. 1)
    num_tokens: int = Field(5, ge=1, le=32)  # n (sec. 4: 5 tokens)
    # w_s of eq. 6: the paper gives no value. Our choice: 1e-3 on the summed squared distance (n x d = 3840 terms on
    # SD 1.x), so a drift of 0.1 per element costs about 0.04, the order of the masked noise loss.
    reg_weight: float = Field(1e-3, ge=0)
    stepwise_steps: int = Field(10, ge=0)  # I of alg. 1 (sec. 4: 10 per DDIM step); 0 skips alg. 1
    ddim_steps: int = Field(50, ge=1)  # T of alg. 1: the DDIM timesteps sampling will walk (sec. 4: 50)
    mask_guidance: bool = True  # eq. 5: the loss only on the subject (refine's masks: GrabCut by default, not SAM)
    instance_prompt: InstancePrompt = "a photo of {token} {class_word}"
    # sec. 4: "an ADAM optimizer" for c_s and c_s^t, no decay or clipping stated (betas and eps: finetune's, Adam's
    # defaults). finetune's shared adam_weight_decay and max_grad_norm do not apply to this method.
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(None, gt=0)  # None: no clipping


def with_subject(prompt_embeds: torch.Tensor, c_s: torch.Tensor) -> torch.Tensor:
    """[c, c_s]: the caption encoding (B, L, d) with its last n rows replaced by c_s (n, d)."""
    out = prompt_embeds.clone()
    out[:, -c_s.shape[0]:] = c_s.to(out.dtype)
    return out


def latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 5's M on the latent grid: the pixel masks (B, 1, H, W) averaged over each latent cell, then binarised."""
    import torch.nn.functional as F

    return (F.adaptive_avg_pool2d(masks.float(), size) >= 0.5).float()


def embedding_regularization(c_s: torch.Tensor, phi_s: torch.Tensor, weight: float) -> torch.Tensor:
    """Eq. 6's second term: w_s ||c_s - phi_s||^2."""
    return weight * (c_s.float() - phi_s.float()).pow(2).sum()


def subject_embeddings(phi_s: torch.Tensor, steps: int, reg_weight: float) -> torch.nn.Module:
    """The trained vectors as one module: c_s and the step-wise c_s^t (alg. 1), each starting at phi_s. Its forward
    gives [c, c_s] (or [c, c_s^t] for row t) and eq. 6's regularization, so a DDP wrapper sees every use of the
    trained vector. Nothing trains until a phase switches its vector on. (The class is built here because method
    modules import torch inside functions.)"""
    import torch

    class SubjectEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("phi_s", phi_s.clone())
            self.c_s = torch.nn.Parameter(phi_s.clone(), requires_grad=False)
            self.rows = torch.nn.ParameterList([torch.nn.Parameter(phi_s.clone(), requires_grad=False)
                                                for _ in range(steps)])

        def vector(self, row: int | None) -> torch.nn.Parameter:
            return self.c_s if row is None else self.rows[row]

        @torch.no_grad()
        def start_row(self, row: int) -> None:
            self.rows[row].copy_(self.vector(row - 1 if row else None))

        def forward(self, prompt_embeds: torch.Tensor, row: int | None = None):
            c_s = self.vector(row)
            return with_subject(prompt_embeds, c_s), embedding_regularization(c_s, self.phi_s, reg_weight)

    return SubjectEmbeddings()


class StepwiseSubject:
    """The trained [c_s^1..c_s^T] with their timesteps, attached to a pipeline by `apply` (eq. 7). A sampling
    timestep uses the embedding of the nearest trained timestep, so other step counts still work."""

    def __init__(self, timesteps: torch.Tensor, embeds: torch.Tensor):
        self.timesteps, self.embeds = timesteps, embeds

    def at(self, t: int) -> torch.Tensor:
        return self.embeds[int((self.timesteps - int(t)).abs().argmin())]

    def apply(self, prompt_embeds: torch.Tensor, t: int) -> torch.Tensor:
        return with_subject(prompt_embeds, self.at(t).to(prompt_embeds.device))


class HiFiTunerMethod(Method):
    name = "hifi-tuner"
    provides = frozenset({STEPWISE_SUBJECT_EMBEDDINGS})
    config_key = "hifi_tuner"
    config_model = HiFiTunerCfg
    default_strategy = "reference-guided"  # sec. 3.3; the paper's headline rows include it

    def instance_prompt(self) -> str:
        # c_s sits in the padding rows, whatever the words; the identifier (subject.token) is kept in the caption so
        # training and the prompt sets (which require one) see the same kind of prompt as the other methods.
        return self.format_prompt(self.cfg.instance_prompt)

    def requirements(self) -> set[str]:
        return set()

    def ddim_timesteps(self) -> list[int]:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.models.pipe.scheduler.config)
        sched.set_timesteps(self.cfg.ddim_steps)
        return [int(t) for t in sched.timesteps]  # T first, as alg. 1 walks them

    def setup(self) -> None:
        import torch

        if self.models.is_sdxl:
            raise SubjectopsError("hifi-tuner is implemented for SD 1.x-shaped models (one text encoder)",
                                  fix="use an SD 1.x base (e.g. --model tiny-sd15), or another method for SDXL")
        with torch.no_grad():
            phi = self.models.encode_prompts([""], self.models.native_resolution).prompt_embeds[0]
        self.timesteps = self.ddim_timesteps() if self.cfg.stepwise_steps else []
        self.subject = subject_embeddings(phi[-self.cfg.num_tokens:].detach().float(), len(self.timesteps),
                                          self.cfg.reg_weight).to(phi.device)
        self.subject_train = self.subject  # what the loss calls: the accelerate-prepared module (DDP) once prepared
        self.rows_started = 0  # alg. 1 initialises c_s^t once, at the start of its phase (not again on resume)

    def phases(self) -> list[Phase]:
        subject = Phase("subject", self.cfg.steps, self.cfg.lr, lambda: [("c_s", self.subject.c_s)])
        stepwise = [Phase(f"stepwise-{k}", self.cfg.stepwise_steps, self.cfg.lr,
                          lambda k=k: [(f"c_s_step_{k}", self.subject.rows[k])]) for k in range(len(self.timesteps))]
        return [subject, *stepwise]

    def optimizer_settings(self, phase: Phase) -> OptimizerSettings:
        """Sec. 4's Adam for c_s and each c_s^t: finetune.hifi_tuner's weight decay (0) and clipping (none)."""
        shared = super().optimizer_settings(phase)
        return OptimizerSettings(betas=shared.betas, eps=shared.eps, weight_decay=self.cfg.weight_decay,
                                 max_grad_norm=self.cfg.max_grad_norm)

    def prepare_modules(self, accelerator) -> list[torch.nn.Module]:
        # c_s and c_s^t live in their own module, prepared like the trained model modules: under several processes
        # DDP averages their gradients (the phase's one trainable vector is what DDP registers).
        self.subject_train = accelerator.prepare(self.subject)
        return [self.subject_train]

    def loss(self, batch: Batch, step: int, phase: Phase):
        import torch

        from subjectops.training import losses
        from subjectops.training.contract import Conditioning

        row, timesteps = None, None
        if phase.name != "subject":
            row = int(phase.name.rsplit("-", 1)[1])
            if self.rows_started <= row:  # alg. 1: c_s^t = c_s^{t+1} (c_s^{T+1} = c_s), at the phase's first step
                self.subject.start_row(row)
                self.rows_started = row + 1
            timesteps = torch.full((batch.latents.shape[0],), self.timesteps[row], dtype=torch.long)
        prompt_embeds, reg = self.subject_train(batch.cond.prompt_embeds, row)
        cond = Conditioning(prompt_embeds, batch.cond.added_cond_kwargs)
        d = self.models.denoise(batch.latents, cond, batch.generator, self.params.finetune.offset_noise, timesteps)
        mask = None
        if self.cfg.mask_guidance and batch.masks is not None:
            mask = latent_mask(batch.masks, tuple(d.pred.shape[-2:])).to(d.pred.device)
        noise_loss = self.weighted_mean(losses.per_sample_mse(d.pred, d.target, mask), d.timesteps)
        return noise_loss + reg, {"noise": noise_loss.detach(), "reg": reg.detach()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"c_s": self.subject.c_s, **{f"c_s_step_{k}": row for k, row in enumerate(self.subject.rows)}}

    def manifest_extra(self) -> dict:
        # what the paper leaves open (sec. 3.2 / eq. 6 give no w_s), and alg. 1's timesteps
        return {"hifi_tuner": {"open_in_paper": {"reg_weight": self.cfg.reg_weight},
                               "ddim_timesteps": self.timesteps}}

    def extra_state(self) -> dict:
        return {"rows_started": self.rows_started}

    def load_extra_state(self, state: dict) -> None:
        self.rows_started = state["rows_started"]

    def stepwise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([T] timesteps, [T, n, d] embeddings); without alg. 1, the one c_s at every timestep."""
        import torch

        timesteps = self.timesteps or self.ddim_timesteps()
        rows = list(self.subject.rows) or [self.subject.c_s] * len(timesteps)
        return torch.tensor(timesteps, dtype=torch.long), torch.stack([r.detach().float().cpu() for r in rows])

    def save(self, out_dir: Path, snapshot: bool = False) -> list[str]:
        from safetensors.torch import save_file

        timesteps, embeds = self.stepwise()
        save_file({"timesteps": timesteps, "embeds": embeds.contiguous(),
                   "c_s": self.subject.c_s.detach().float().cpu(),
                   "phi_s": self.subject.phi_s.cpu()}, out_dir / EMBEDS_FILE,
                  metadata={"reg_weight": str(self.cfg.reg_weight), "num_tokens": str(self.cfg.num_tokens)})
        return [EMBEDS_FILE]

    def attach_live(self, pipe) -> None:
        pipe.subject_embeddings = StepwiseSubject(*self.stepwise())  # the current c_s^t, sampled by eq. 7

    @classmethod
    def apply(cls, pipe, finetune_dir: Path, info: dict) -> None:
        from safetensors.torch import load_file

        state = load_file(Path(finetune_dir) / EMBEDS_FILE)
        pipe.subject_embeddings = StepwiseSubject(state["timesteps"], state["embeds"])
