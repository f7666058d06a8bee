"""alchemy: Image-Alchemy's two-stage generation (seed 002 secs. 3.3-3.4, fig. 2-3, app. A.1).

1. Stage 1: the unmodified base model draws the scene from the prompt with the class word in place of the token
   ("a photo of immen dog" -> "a photo of dog"; the LoRA is switched off, or a separate base pipeline is used
   when the finetune replaced weights).
2. The subject region of that scene is segmented, by CLIPSeg prompted with the class word when its weights are
   present (the paper uses Grounded-SAM, also text-prompted), else by the default backend (GrabCut), and blurred,
   with the exponential-decay blur by default (subjectops.inference.blur).
3. Stage 2: img2img from the blurred scene with the LoRA on and the token in the prompt, at `strength`. Its output
   is the final image, as in the paper (sec. 3.4, fig. 3: the decoder's output is "the final, personalized image").
4. Only with `infer.alchemy.composite` (off by default): the img2img image is composited into the stage-1 scene
   through the feathered mask, so that outside the mask (beyond the feather) the scene is the base model's, pixel for
   pixel. This step is the project's addition, not the paper's: sec. 3.4.2 keeps the composition by isolating the
   insertion in img2img from a base scene, not by pasting.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Optional

from pydantic import Field, field_validator

from subjectops.config_base import StrictModel
from subjectops.inference.base import InferenceSpec, StageInputs, Strategy

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


class AlchemyInferCfg(StrictModel):
    """infer.alchemy: Image-Alchemy two-stage generation (seed 002 secs. 3.3-3.4, app. A.1): the base model's scene
    with the class word, the subject region segmented and blurred, then img2img with the LoRA and the token, whose
    output is the image (the paper's); `composite` pastes it into the scene instead (the project's addition)."""

    strength: float = Field(0.6, ge=0, le=1)  # img2img strength: not given by the paper (our choice)
    blur: Literal["exponential-decay", "gaussian"] = "exponential-decay"  # app. A.1: the second was better
    kernel_size: int = Field(151, ge=1)  # app. A.1
    sigma: float = Field(100.0, gt=0)
    decay: float = Field(5.0, ge=0)  # lambda, per shorter image side (see inference/blur.py)
    # Not the paper's (its final image is the img2img output, sec. 3.4 / fig. 3): true composites the img2img image
    # into the stage-1 scene through the feathered mask, keeping the base model's pixels outside it.
    composite: bool = False
    feather: int = Field(8, ge=0)  # with composite: pixels over which the img2img image fades into the scene
    # segments the stage-1 scene: clipseg is prompted with the class word (the paper's Grounded-SAM takes text too);
    # auto = clipseg when its weights are on this machine, else grabcut (resolved when infer records its spec)
    segmenter: Literal["auto", "clipseg", "grabcut", "sam"] = "auto"
    clipseg_model: str = "CIDAS/clipseg-rd64-refined"  # hub id or local directory
    clipseg_threshold: float = Field(0.4, gt=0, lt=1)
    # segmentation sees the scene downscaled to this longest side (GrabCut at SDXL's 1024 px takes minutes on CPU)
    mask_resolution: int = Field(256, ge=32)
    sam_checkpoint: Optional[str] = None

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"a Gaussian kernel size must be odd, got {v}")
        return v


def scene_prompt(prompt: str, identifier: str, class_word: str) -> str:
    """The prompt with the identifier replaced by the class word (sec. 3.3), once: "{token} {class}" -> "{class}"."""
    word = re.escape(identifier)
    if re.search(rf"\b{word}\s+{re.escape(class_word)}\b", prompt):
        out = re.sub(rf"\b{word}\s+", "", prompt)
    else:
        out = re.sub(rf"\b{word}\b", class_word, prompt)
    return re.sub(r"\s{2,}", " ", out).strip()


def to_array(image: Image.Image) -> np.ndarray:
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def to_image(pixels: np.ndarray) -> Image.Image:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8))


def resolved_segmenter(cfg) -> str:
    """The segmenter `auto` stands for on this machine: clipseg when its weights are present, else grabcut."""
    if cfg.segmenter != "auto":
        return cfg.segmenter
    from subjectops.segment import clipseg

    return "clipseg" if clipseg.available(cfg.clipseg_model) else "grabcut"


def segment_scene(segment: Callable[[Image.Image], Image.Image], scene: Image.Image, max_side: int) -> np.ndarray:
    """The subject mask (bool, the scene's size), segmented on a copy downscaled to at most `max_side` pixels."""
    import numpy as np
    from PIL import Image

    scale = max_side / max(scene.size)
    small = scene.resize((max(1, round(scene.width * scale)), max(1, round(scene.height * scale))), Image.BICUBIC) \
        if scale < 1 else scene
    mask = segment(small)
    return np.asarray(mask.resize(scene.size, Image.NEAREST) if mask.size != scene.size else mask) > 127


def blurred_scene(scene: Image.Image, mask: np.ndarray, cfg) -> Image.Image:
    """The stage-1 scene with its subject region blurred as `cfg.blur` says (app. A.1)."""
    from subjectops.inference import blur

    pixels = to_array(scene)
    if cfg.blur == "gaussian":
        return to_image(blur.gaussian_blur_region(pixels, mask, cfg.kernel_size, cfg.sigma))
    return to_image(blur.exponential_decay_blur(pixels, mask, cfg.kernel_size, cfg.sigma, cfg.decay))


def img2img(pipe, image: Image.Image, prompt: str, seed: int, strength: float, steps: int,
            guidance_scale: float) -> Image.Image:
    """Image-to-image from `image` with `pipe` (an img2img pipeline): the image is noised to the timestep that
    `strength` selects and denoised from there. With no denoising step (int(steps * strength) == 0, e.g. strength
    0) the input is returned as is: diffusers would fail on an empty schedule, and a VAE round trip would alter it."""
    import torch

    if int(steps * strength) == 0:
        return image.copy()
    return pipe(prompt, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(int(seed))).images[0]


class AlchemyStrategy(Strategy):
    name = "alchemy"
    section = "alchemy"
    config_model = AlchemyInferCfg

    def __init__(self, pipe, spec: InferenceSpec, inputs: StageInputs):
        from diffusers import AutoPipelineForImage2Image

        super().__init__(pipe, spec, inputs)
        info = json.loads((inputs.finetune / "method.json").read_text())
        self.identifier, self.class_word = info["identifier"], info["class_word"]
        self.img2img = AutoPipelineForImage2Image.from_pipe(pipe)  # shares the modules, so the LoRA too
        self.img2img.set_progress_bar_config(disable=True)
        self.segment = self._segmenter(resolved_segmenter(self.config))
        # A LoRA is switched off for stage 1; a finetune that replaced weights needs the base loaded beside it.
        self.base = None if getattr(pipe.unet, "peft_config", None) else self._load_base()

    @classmethod
    def spec_for(cls, infer, resolution: int) -> InferenceSpec:
        """The spec with `auto` resolved to the segmenter that runs, so the manifest and the served model say which."""
        spec = super().spec_for(infer, resolution)
        return spec.model_copy(update={"config": {**spec.config, "segmenter": resolved_segmenter(infer.alchemy)}})

    def _segmenter(self, name: str) -> Callable[[Image.Image], Image.Image]:
        """image -> subject mask; clipseg is prompted with the class word (sec. 3.3)."""
        if name == "clipseg":
            from subjectops.segment.clipseg import ClipSegBackend

            backend = ClipSegBackend(self.config.clipseg_model, self.config.clipseg_threshold)
            return lambda image: backend.mask(image, self.class_word)
        from subjectops.config_base import RefineCfg
        from subjectops.segment import get_backend

        return get_backend(RefineCfg(mask_backend=name, sam_checkpoint=self.config.sam_checkpoint)).mask

    def _load_base(self):
        from subjectops.models.loading import load_pipeline
        from subjectops.models.sampling import use_scheduler

        base = load_pipeline(self.inputs.model, dtype=self.pipe.unet.dtype).to(self.pipe.device)
        use_scheduler(base, self.spec.scheduler)
        return base

    @contextmanager
    def base_model(self) -> Iterator:
        """The unmodified base model (sec. 3.3): the LoRA switched off while inside."""
        if self.base is not None:
            yield self.base
            return
        self.pipe.disable_lora()
        try:
            yield self.pipe
        finally:
            self.pipe.enable_lora()

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [self.generate_explained(prompt, seed)[0] for prompt, seed in zip(prompts, seeds)]

    def generate_explained(self, prompt: str, seed: int) -> tuple[Image.Image, dict[str, Image.Image], dict]:
        """The img2img output (the paper's final image), with the stage-1 scene and its blurred copy; with
        `composite`, that output pasted into the scene, and the img2img output among the intermediates."""
        from subjectops.inference import blur
        from subjectops.models.sampling import generate

        s, cfg = self.spec, self.config
        with self.base_model() as base:
            scene = generate(base, [scene_prompt(prompt, self.identifier, self.class_word)], [seed], s.steps,
                             s.guidance_scale, s.resolution)[0]
        mask = segment_scene(self.segment, scene, cfg.mask_resolution)
        blurred = blurred_scene(scene, mask, cfg)
        inserted = img2img(self.img2img, blurred, prompt, seed, cfg.strength, s.steps, s.guidance_scale)
        if not cfg.composite:
            return inserted, {"stage1": scene, "blurred": blurred}, {}
        final = to_image(blur.composite(to_array(scene), to_array(inserted), mask, cfg.feather))
        return final, {"stage1": scene, "blurred": blurred, "img2img": inserted}, {}
