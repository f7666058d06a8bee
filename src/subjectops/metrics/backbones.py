"""Metric encoders: DINO ViT-S/16, CLIP ViT-B/32, Inception (FID) and the LPIPS backbone.

Every encoder loads through the real code path (`from_pretrained` on a hub id or a local directory;
torchvision/torch-fidelity weight files from the torch hub cache or a path). Nothing here downloads:
offline, a missing encoder fails at once with a message saying how to provide its weights.

Tiny mode (``evaluate.tiny``; see config.py): small seeded random encoders built offline from configs
(ViTConfig, CLIPConfig with the project's CLIP-format BPE), saved as directories and loaded back through
the same `from_pretrained` path. They carry a marker file, so every number they produce is recorded as
coming from random weights. Their numbers measure nothing about quality.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from subjectops import world
from subjectops.errors import ModelNotFoundError

TINY_MARKER = "subjectops_tiny.json"
WORLD = world.ENCODER_ID  # an encoder id: the miniature world's trained encoder of that role
TINY_ENCODER_VERSION = "1"
TINY_SEED = 0
TINY_IMAGE_SIZE = 32
MIN_TOKENIZER_SIZE = 100  # offline, CLIPTokenizer.from_pretrained("hub/id") may return a 2-entry stub
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneInfo:
    """What produced a number: recorded next to every metric value."""

    role: str  # dino | clip | inception | lpips | judge
    id: str  # the configured id (hub id, directory, alex, tiny, world, ...)
    pretrained: bool  # False = random weights: the number measures nothing about quality
    source: str  # what was actually loaded (resolved directory, hub id, weight file)
    description: str
    # pretrained (on real data) | world-pretrained (the miniature world's) | random: the three kinds of numbers,
    # never compared with each other
    provenance: str = ""

    def __post_init__(self) -> None:
        if not self.provenance:
            object.__setattr__(self, "provenance", "pretrained" if self.pretrained else "random")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _cache_root() -> Path:
    try:  # the lead's tiny-model cache, so all built artefacts live together
        from subjectops.models.tiny import cache_root

        return cache_root()
    except ImportError:  # pragma: no cover
        return Path(os.environ.get("SUBJECTOPS_HOME", Path.home() / ".cache" / "subjectops"))


def how_to_provide(role: str, model_id: str, key: str) -> str:
    return (
        f"download the {role} encoder '{model_id}' on a machine with network access (`hf download {model_id}`), "
        f"then copy the folder here and set {key}=/path/to/folder (params.yaml or --set), or copy the hub cache "
        f"and set HF_HOME; for a smoke test without weights set evaluate.tiny=true (random encoders, numbers "
        f"that measure nothing)"
    )


# ---------------------------------------------------------------------------------------------------
# Preprocessing: batched, on the device. Values come from the saved image processor config, so a real
# checkpoint is preprocessed exactly as its processor would (resize, center crop, normalize).
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    resize: Optional[int]  # shortest edge (CLIP) or None
    resize_hw: Optional[tuple[int, int]]  # exact (h, w) resize (ViT) or None
    crop: Optional[tuple[int, int]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str  # interpolation

    @classmethod
    def from_processor(cls, proc: Any) -> Preprocess:
        size = getattr(proc, "size", None) or {}
        size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
        crop = dict(crop) if crop else None
        resample = getattr(proc, "resample", 3)
        resample = int(getattr(resample, "value", resample)) if resample is not None else 3
        mode = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(resample, "bicubic")
        return cls(
            resize=size.get("shortest_edge"),
            resize_hw=(size["height"], size["width"]) if "height" in size else None,
            crop=(crop["height"], crop["width"]) if crop else None,
            mean=tuple(proc.image_mean),
            std=tuple(proc.image_std),
            mode=mode,
        )

    def __call__(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) float in [0, 1] -> normalized pixel values for the encoder."""
        x = images
        if self.resize_hw is not None:
            x = F.interpolate(x, size=self.resize_hw, mode=self.mode, align_corners=False, antialias=True)
        elif self.resize is not None:
            h, w = x.shape[-2:]
            s = self.resize / min(h, w)
            x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode=self.mode,
                              align_corners=False, antialias=True)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            top, left = max(0, (h - ch) // 2), max(0, (w - cw) // 2)
            x = x[..., top:top + ch, left:left + cw]
        x = x.clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


# ---------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------
class DinoEncoder:
    """DINO ViT-S/16: the CLS token of the last layer (after the final layer norm), as in DreamBooth's DINO
    score (seed 001 sec. 4; seed 003 sec. 5)."""

    def __init__(self, model: Any, pre: Preprocess, info: BackboneInfo, device: torch.device):
        self.model, self.pre, self.info, self.device = model.to(device).eval(), pre, info, device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        out = self.model(pixel_values=self.pre(images.to(self.device)))
        return out.last_hidden_state[:, 0].float()


def _features(out: Any) -> Tensor:
    # transformers 5 returns a model output with the projected embedding in pooler_output; 4.x a tensor.
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipEncoder:
    """CLIP ViT-B/32: projected image embeddings (CLIP-I) and text embeddings (CLIP-T)."""

    def __init__(self, model: Any, tokenizer: Any, pre: Preprocess, info: BackboneInfo, device: torch.device):
        self.model, self.tokenizer, self.pre = model.to(device).eval(), tokenizer, pre
        self.info, self.device = info, device

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=self.pre(images.to(self.device)))).float()

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tok)).float()


# ---------------------------------------------------------------------------------------------------
# Tiny encoders (random, seeded, offline)
# ---------------------------------------------------------------------------------------------------
def _build_atomically(name: str, build) -> Path:
    target = _cache_root() / "tiny-encoders" / f"{name}-v{TINY_ENCODER_VERSION}"
    if (target / TINY_MARKER).exists():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build(partial)
    (partial / TINY_MARKER).write_text(json.dumps(
        {"encoder": name, "version": TINY_ENCODER_VERSION, "seed": TINY_SEED, "random_weights": True}))
    try:
        partial.rename(target)
    except OSError:  # another process finished first; its build is identical (same seed)
        shutil.rmtree(partial, ignore_errors=True)
    return target


def tiny_dino_dir() -> Path:
    def build(out: Path) -> None:
        from transformers import ViTConfig, ViTImageProcessor, ViTModel

        torch.manual_seed(TINY_SEED)
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=TINY_IMAGE_SIZE, patch_size=8)
        ViTModel(cfg, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
        ViTImageProcessor(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, resample=3,
                          image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(out)

    return _build_atomically("tiny-dino", build)


def tiny_clip_dir() -> Path:
    def build(out: Path) -> None:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from subjectops.data.prompts import BACKGROUNDS, IMAGE_TYPES, STYLES
        from subjectops.models.tokenizer import train_clip_bpe

        extra = "\n".join([*IMAGE_TYPES, *BACKGROUNDS, *(s for v in STYLES.values() for s in v)])
        tok_dir = train_clip_bpe(out / "_tok", extra_text=extra)
        tok = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
        tok.save_pretrained(out)
        shutil.rmtree(tok_dir)
        vocab = len(tok)
        torch.manual_seed(TINY_SEED)
        cfg = CLIPConfig(
            text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab - 2,
                             eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=32),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=32),
            projection_dim=32,
        )
        CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
        CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE,
                           "width": TINY_IMAGE_SIZE}, do_center_crop=True, resample=3,
                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out)

    return _build_atomically("tiny-clip", build)


def _resolve(role: str, model_id: str, key: str) -> tuple[str, bool]:
    """(source for from_pretrained, is_local_dir)."""
    if model_id == "tiny":
        return str(tiny_dino_dir() if role.lower() == "dino" else tiny_clip_dir()), True
    if model_id == WORLD:
        return str(world.encoder_dir(role.lower())), True
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{key} = {model_id}: the directory has no config.json, so it is not a "
                                     f"saved transformers model", fix=how_to_provide(role, "the model", key))
        return str(path), True
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelNotFoundError(f"{key} = {model_id}: directory does not exist", fix="check the path")
    return model_id, False


def _is_random(source: str, local: bool) -> bool:
    return local and (Path(source) / TINY_MARKER).exists()


def _load(role: str, model_id: str, key: str, cache_dir: Optional[str], loader):
    source, local = _resolve(role, model_id, key)
    kwargs: dict[str, Any] = {"cache_dir": cache_dir}
    if not local and _offline():
        kwargs["local_files_only"] = True
    try:
        return source, local, loader(source, kwargs)
    except (OSError, ValueError) as exc:
        where = f": {exc}" if local or not _offline() else " (HF_HUB_OFFLINE=1: nothing is downloaded)"
        raise ModelNotFoundError(f"{role} encoder '{model_id}' ({key}) is not available on this machine{where}",
                                 fix=how_to_provide(role, model_id, key)) from None


def load_dino(model_id: str, device: torch.device, cache_dir: Optional[str] = None) -> DinoEncoder:
    from transformers import AutoImageProcessor, ViTModel

    key = "evaluate.backbones.dino"

    def loader(src: str, kw: dict) -> tuple[Any, Any]:
        model = ViTModel.from_pretrained(src, add_pooling_layer=False, **kw)
        return model, AutoImageProcessor.from_pretrained(src, **kw)

    source, local, (model, proc) = _load("DINO", model_id, key, cache_dir, loader)
    random = _is_random(source, local)
    info = BackboneInfo("dino", model_id, not random, source,
                        "tiny random ViT (seeded)" if random else
                        "world ViT, multi-view instance discrimination (CLS embedding)" if model_id == WORLD else
                        "DINO ViT CLS embedding", world.PROVENANCE if model_id == WORLD else "")
    return DinoEncoder(model, Preprocess.from_processor(proc), info, device)


def load_clip(model_id: str, device: torch.device, cache_dir: Optional[str] = None) -> ClipEncoder:
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    key = "evaluate.backbones.clip"

    def loader(src: str, kw: dict) -> tuple[Any, Any, Any]:
        model = CLIPModel.from_pretrained(src, **kw)
        tok = CLIPTokenizer.from_pretrained(src, model_max_length=77, **kw)
        if len(tok) < MIN_TOKENIZER_SIZE:
            raise OSError(f"its tokenizer has only {len(tok)} entries (vocabulary files missing)")
        return model, tok, AutoImageProcessor.from_pretrained(src, **kw)

    source, local, (model, tok, proc) = _load("CLIP", model_id, key, cache_dir, loader)
    random = _is_random(source, local)
    info = BackboneInfo("clip", model_id, not random, source,
                        "tiny random CLIP (seeded, project BPE tokenizer)" if random else
                        "world CLIP, contrastive on world images and captions" if model_id == WORLD else
                        "CLIP projected embeddings", world.PROVENANCE if model_id == WORLD else "")
    return ClipEncoder(model, tok, Preprocess.from_processor(proc), info, device)


# ---------------------------------------------------------------------------------------------------
# Inception (FID) and the LPIPS backbone: weight files, never downloaded
# ---------------------------------------------------------------------------------------------------
def hub_checkpoint(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def find_inception(setting: str) -> Optional[Path]:
    """The FID Inception weight file named by evaluate.backbones.inception, or None when not present."""
    if setting in ("none", "", "null"):
        return None
    if setting == "auto":
        p = hub_checkpoint(INCEPTION_FILE)
        return p if p.is_file() else None
    p = Path(setting).expanduser()
    if not p.is_file():
        raise ModelNotFoundError(
            f"evaluate.backbones.inception = {setting}: file does not exist",
            fix=f"download torch-fidelity's {INCEPTION_FILE} elsewhere and point the setting at it, "
                f"or set it to auto/none (FID then uses DINO features)")
    return p


LPIPS_NETS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


class LpipsNet:
    """torchmetrics' LPIPS network (Zhang et al. 2018; Hypnos tables 1-2), used so that each image's
    features are computed once and all generated x reference pairs are scored from them.

    LPIPS(x, y) = sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2, f_l channel-normalized activations.
    Since w_l is a 1x1 convolution (a per-channel weight), mean_hw w.(a-b)^2 expands to
    sum_c w_c [mean(a_c^2) + mean(b_c^2) - 2 mean(a_c b_c)]: one matrix product per layer for all pairs.
    """

    def __init__(self, net: Any, info: BackboneInfo, device: torch.device):
        self.net, self.info, self.device = net.to(device).eval(), info, device

    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:
        from torchmetrics.functional.image.lpips import _normalize_tensor

        x = self.net.scaling_layer(2 * images.to(self.device) - 1)  # [0,1] -> [-1,1], LPIPS scaling
        outs = self.net.net.forward(x)
        return [_normalize_tensor(o) for o in outs]

    def _weights(self) -> list[Tensor]:
        return [lin.model[-1].weight.view(-1) for lin in self.net.lins]

    @torch.no_grad()
    def pairwise(self, fa: list[Tensor], fb: list[Tensor]) -> Tensor:
        """(N, M) LPIPS between every image of a and every image of b, from their features."""
        total = None
        for a, b, w in zip(fa, fb, self._weights()):
            a, b, w = a.double(), b.double(), w.double()
            hw = a.shape[-1] * a.shape[-2]
            sa = (a.pow(2).mean((2, 3)) * w).sum(1)  # (N,)
            sb = (b.pow(2).mean((2, 3)) * w).sum(1)  # (M,)
            cross = torch.einsum("nchw,mchw->nm", a * w.view(1, -1, 1, 1), b) / hw
            d = (sa[:, None] + sb[None, :] - 2 * cross).clamp_min(0)
            total = d if total is None else total + d
        return total.float()


class WorldLpips(LpipsNet):
    """LPIPS over the world judge's stage activations (channel-normalized, as LPIPS normalizes AlexNet's), with
    uniform channel weights: real LPIPS fits its weights to human judgements, which the world does not have
    (Zhang et al. 2018 report unweighted deep features as a baseline that already tracks perception)."""

    def __init__(self, judge: Any, info: BackboneInfo, device: torch.device):
        self.net, self.info, self.device = judge.to(device).eval(), info, device

    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:
        outs = self.net.stage_features(images.to(self.device))
        return [o / (o.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for o in outs]

    def _weights(self) -> list[Tensor]:
        return [torch.ones(w, device=self.device) for w in self.net.widths]


class WorldFeatures:
    """The world judge: pooled features for FID (the world's Inception) and its ground-truth heads."""

    def __init__(self, judge: Any, info: BackboneInfo, device: torch.device):
        self.net, self.info, self.device = judge.to(device).eval(), info, device

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        return self.net(images.to(self.device))["features"].float()

    @torch.no_grad()
    def judge(self, images: Tensor) -> dict[str, Tensor]:
        return self.net(images.to(self.device))


def load_world_judge(device: torch.device, role: str = "judge") -> Any:
    from subjectops.world.judge import WorldJudge

    folder = world.encoder_dir("judge")
    info = BackboneInfo(role, WORLD, True, str(folder), "world judge CNN (trained on the world's ground truth)",
                        world.PROVENANCE)
    judge = WorldJudge.load(folder, device)
    return WorldLpips(judge, info, device) if role == "lpips" else WorldFeatures(judge, info, device)


def load_lpips(setting: str, device: torch.device) -> LpipsNet:
    from torchmetrics.functional.image.lpips import _LPIPS

    if setting == WORLD:
        return load_world_judge(device, "lpips")
    if setting == "tiny":
        # Random AlexNet backbone (seeded; nothing to download) with torchmetrics' shipped linear weights.
        torch.manual_seed(TINY_SEED)
        net = _LPIPS(pretrained=True, net="alex", pnet_rand=True, use_dropout=True)
        info = BackboneInfo("lpips", "tiny", False, "torchmetrics LPIPS, random AlexNet backbone",
                            "LPIPS over a random backbone: measures nothing perceptual")
        return LpipsNet(net, info, device)
    if setting not in LPIPS_NETS:
        raise ModelNotFoundError(f"evaluate.backbones.lpips = {setting!r} is not a known LPIPS backbone",
                                 fix="use alex, vgg, squeeze or tiny")
    import torchvision

    weights = torchvision.models.get_model_weights(LPIPS_NETS[setting]).DEFAULT
    file = hub_checkpoint(Path(weights.url).name)
    if not file.is_file():
        raise ModelNotFoundError(
            f"LPIPS backbone '{setting}' needs torchvision's ImageNet weights {file.name}, which are not in "
            f"the torch hub cache ({file.parent}); nothing is downloaded",
            fix="on a machine with network run `python -c \"import torchvision; "
                f"torchvision.models.{LPIPS_NETS[setting]}"
                f"(weights='DEFAULT')\"` and copy {file.name} into {file.parent} (or set TORCH_HOME), "
                f"or set evaluate.backbones.lpips=tiny for a smoke test")
    net = _LPIPS(pretrained=True, net=setting, pnet_rand=False, use_dropout=True)  # loads from the cache file
    info = BackboneInfo("lpips", setting, True, str(file), f"LPIPS {setting} (torchmetrics linear weights)")
    return LpipsNet(net, info, device)
