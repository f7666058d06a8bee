"""Image-Alchemy (seed 002) on tiny-sdxl: the LoRA method (attention projections only, scale 1, token from the scan)
and the two-stage `alchemy` inference strategy (base scene, blur, img2img with the LoRA, whose output is the image;
the composite into the scene only when asked for)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import record_outputs
from PIL import Image

from subjectops.config import InferCfg, ModelCfg, load_params
from subjectops.data import rare_tokens
from subjectops.errors import SubjectopsError
from subjectops.inference import StageInputs, blur, load_strategy
from subjectops.inference.alchemy import AlchemyStrategy, img2img, scene_prompt, segment_scene, to_array, to_image
from subjectops.methods.alchemy import AlchemyMethod
from subjectops.models.loading import load_pipeline
from subjectops.models.sampling import generate
from subjectops.training.models import DiffusionModels

SDXL = ModelCfg(base="tiny-sdxl")
RES = 64


def alchemy_params(repo_root, *extra):
    return load_params(repo_root / "params.yaml", ["model.base=tiny-sdxl", "finetune.method=alchemy", *extra])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def sample(pipe, prompt="a photo of immen dog on a beach", seed=3) -> np.ndarray:
    return pixels(generate(pipe, [prompt], [seed], 2, 5.0, RES)[0])


@pytest.fixture(scope="module")
def lora_finetune(tmp_path_factory, repo_root):
    """A saved alchemy finetune whose LoRA visibly changes the output (random up-projections instead of zeros)."""
    out = tmp_path_factory.mktemp("alchemy-finetune")
    params = alchemy_params(repo_root, "finetune.alchemy.token=immen")
    method = AlchemyMethod(params, "dog", DiffusionModels.from_pipeline(load_pipeline(SDXL)))
    method.setup()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in method.models.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    method.save(out)
    (out / "method.json").write_text(json.dumps({"method": "alchemy", "identifier": "immen", "class_word": "dog",
                                                 "base_model": "tiny-sdxl"}))
    record_outputs(out)
    return out


def test_lora_trains_the_unet_attention_projections_only_at_scale_one(repo_root):
    params = alchemy_params(repo_root, "finetune.alchemy.token=immen", "finetune.alchemy.rank=2")
    models = DiffusionModels.from_pipeline(load_pipeline(SDXL))
    method = AlchemyMethod(params, "dog", models)
    method.setup()
    named = method._named()
    assert named and all(n.startswith("unet.") and "lora_" in n for n, _ in named)
    projections = {re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.", n).group(1) for n, _ in named}
    assert projections == {"to_q", "to_k", "to_v", "to_out.0"}
    assert all(".attn1." in n or ".attn2." in n for n, _ in named)
    scalings = {m.scaling["default"] for m in models.unet.modules() if hasattr(m, "scaling") and m.scaling}
    assert scalings == {1.0}  # alpha defaults to the rank: W + 1 * U V^T (app. A.4 eq. 5)
    for encoder in models.text_encoders:  # both SDXL text encoders frozen, no adapter
        assert not any(p.requires_grad for p in encoder.parameters())
        assert not any("lora" in n for n, _ in encoder.named_parameters())
    phase = method.phases()[0]
    assert not phase.text_changes and not phase.uses_priors  # sec. 3.2.1: no prior preservation
    assert method.requirements() == set()


def test_identifier_is_the_given_token_or_the_best_of_the_cached_scan(repo_root, tmp_path):
    params = alchemy_params(repo_root, f"finetune.alchemy.token_scan.cache_dir={tmp_path}",
                            "finetune.alchemy.token_scan.candidates=[immen, pasqu, iklan]")
    path, key = rare_tokens.cache_file(params.finetune.alchemy.token_scan, params.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": key, "scores": {"immen": 0.4, "pasqu": 0.2, "iklan": 0.3, "sks": 0.1}}))
    method = AlchemyMethod(params, "dog", models=None)
    assert method.identifier() == "pasqu"  # sks scores lowest but is a reference token, never chosen
    assert method.instance_prompt() == "a photo of pasqu dog"
    extra = method.manifest_extra()["alchemy"]
    assert extra["token_source"] == f"token scan {path}" and extra["open_in_paper"]["alpha"] == 8
    given = AlchemyMethod(alchemy_params(repo_root, "finetune.alchemy.token=koval"), "dog", models=None)
    assert given.identifier() == "koval"
    assert given.manifest_extra()["alchemy"]["token_source"] == "finetune.alchemy.token"


@pytest.fixture(scope="module")
def tiny_clipseg(tmp_path_factory):
    """A CLIPSeg with random weights, saved like a downloaded one (the tiny preset's CLIP tokenizer)."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    from subjectops.models.loading import resolve

    out = tmp_path_factory.mktemp("clipseg")
    tokenizer = CLIPTokenizer.from_pretrained(resolve(SDXL), subfolder="tokenizer")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(CLIPSegConfig(
        text_config=dict(vocab_size=len(tokenizer), **small), vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=16, extract_layers=[0, 1], reduce_dim=16, decoder_intermediate_size=32)).save_pretrained(out)
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def test_auto_segmenter_is_clipseg_when_its_weights_are_present_and_prompted_with_the_class_word(tiny_clipseg,
                                                                                                 tmp_path):
    from subjectops.segment.clipseg import ClipSegBackend

    present = InferCfg(alchemy={"clipseg_model": str(tiny_clipseg)})
    absent = InferCfg(alchemy={"clipseg_model": str(tmp_path / "no-such-model")})
    assert AlchemyStrategy.spec_for(present, RES).config["segmenter"] == "clipseg"
    assert AlchemyStrategy.spec_for(absent, RES).config["segmenter"] == "grabcut"
    with pytest.raises(SubjectopsError, match="CLIPSeg weights .* are not on this machine"):
        ClipSegBackend(str(tmp_path / "no-such-model"))
    backend = ClipSegBackend(str(tiny_clipseg))
    prompts, processor = [], backend.processor
    backend.processor = lambda **kw: prompts.append(kw["text"]) or processor(**kw)
    scene = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    mask = np.asarray(backend.mask(scene, "dog"))
    assert mask.shape == (48, 40) and mask.any() and prompts == [["dog"]]


def test_a_lora_that_is_not_loaded_leaves_the_base_output_unchanged_bit_for_bit(lora_finetune):
    pipe = load_pipeline(SDXL)
    base = sample(pipe)
    pipe.load_lora_weights(str(lora_finetune), weight_name="pytorch_lora_weights.safetensors")
    with_lora = sample(pipe)
    assert np.abs(with_lora.astype(int) - base).max() > 10  # the adapter is live
    pipe.disable_lora()
    np.testing.assert_array_equal(sample(pipe), base)
    pipe.enable_lora()
    np.testing.assert_array_equal(sample(pipe), with_lora)
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(sample(pipe), base)


def test_img2img_with_strength_zero_returns_its_input(lora_finetune):
    from diffusers import AutoPipelineForImage2Image

    pipe = AutoPipelineForImage2Image.from_pipe(load_pipeline(SDXL))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (RES, RES, 3), dtype=np.uint8))
    np.testing.assert_array_equal(pixels(img2img(pipe, image, "a photo of dog", 0, 0.0, 4, 5.0)), pixels(image))
    changed = img2img(pipe, image, "a photo of dog", 0, 0.5, 4, 5.0)
    assert changed.size == image.size and np.abs(pixels(changed).astype(int) - pixels(image)).max() > 10


def test_scene_prompt_puts_the_class_word_in_place_of_the_token():
    assert scene_prompt("a photo of immen dog on a beach", "immen", "dog") == "a photo of dog on a beach"
    assert scene_prompt("immen wearing a hat", "immen", "dog") == "dog wearing a hat"
    assert scene_prompt("a photo of immensity", "immen", "dog") == "a photo of immensity"


def test_the_default_image_is_the_img2img_output_as_in_the_paper(lora_finetune):
    """Sec. 3.4 / fig. 3: the decoder's output of the img2img pass is the final image; nothing is pasted back."""
    from subjectops.inference.alchemy import blurred_scene

    cfg = InferCfg(steps=2, guidance_scale=5.0, alchemy={"strength": 0.5, "segmenter": "grabcut"})
    spec = AlchemyStrategy.spec_for(cfg, RES)
    assert spec.config["composite"] is False  # recorded in infer's manifest
    strategy = load_strategy(spec, StageInputs(model=SDXL, finetune=lora_finetune))
    prompt, seed = "a photo of immen dog on a beach", 5
    final, stages, _ = strategy.generate_explained(prompt, seed)
    assert list(stages) == ["stage1", "blurred"]
    mask = segment_scene(strategy.segment, stages["stage1"], strategy.config.mask_resolution)
    blurred = blurred_scene(stages["stage1"], mask, strategy.config)
    np.testing.assert_array_equal(pixels(blurred), pixels(stages["blurred"]))
    expected = img2img(strategy.img2img, blurred, prompt, seed, 0.5, 2, 5.0)  # the LoRA on, the token in the prompt
    np.testing.assert_array_equal(pixels(final), pixels(expected))
    outside = blur.distance_from_mask(mask) >= 4  # where a composite (feather 4) would keep the scene's pixels
    assert outside.any() and (pixels(final)[outside] != pixels(stages["stage1"])[outside]).any()  # not composited
    np.testing.assert_array_equal(pixels(strategy.generate([prompt], [seed])[0]), pixels(final))


@pytest.mark.parametrize("segmenter", ["grabcut", "clipseg"])
def test_the_composite_option_keeps_the_base_scene_outside_the_mask(lora_finetune, tiny_clipseg, segmenter):
    cfg = InferCfg(steps=2, guidance_scale=5.0, alchemy={"strength": 0.5, "feather": 4, "segmenter": segmenter,
                                                         "clipseg_model": str(tiny_clipseg), "composite": True})
    spec = AlchemyStrategy.spec_for(cfg, RES)
    assert spec.config["strength"] == 0.5 and spec.config["kernel_size"] == 151  # recorded in infer's manifest
    assert spec.config["composite"] is True
    strategy = load_strategy(spec, StageInputs(model=SDXL, finetune=lora_finetune))
    prompt, seed = "a photo of immen dog on a beach", 5
    final, stages, _ = strategy.generate_explained(prompt, seed)
    assert list(stages) == ["stage1", "blurred", "img2img"]
    # stage 1 is the unmodified base model's image of the class-word prompt
    base = load_pipeline(SDXL)
    from subjectops.models.sampling import use_scheduler

    use_scheduler(base, spec.scheduler)
    np.testing.assert_array_equal(pixels(stages["stage1"]), sample(base, "a photo of dog on a beach", seed))
    mask = segment_scene(strategy.segment, stages["stage1"], strategy.config.mask_resolution)
    outside = blur.distance_from_mask(mask) >= 4  # beyond the composite's feather
    assert outside.any() and mask.any()
    np.testing.assert_array_equal(pixels(final)[outside], pixels(stages["stage1"])[outside])
    assert np.abs(pixels(final)[mask].astype(int) - pixels(stages["stage1"])[mask]).max() > 10  # the LoRA inserted
    composite = to_image(blur.composite(to_array(stages["stage1"]), to_array(stages["img2img"]), mask, 4))
    np.testing.assert_array_equal(pixels(final), pixels(composite))
    np.testing.assert_array_equal(pixels(strategy.generate([prompt], [seed])[0]), pixels(final))  # reproducible
    if segmenter == "clipseg":  # prompted with the class word, not the token
        from subjectops.segment.clipseg import ClipSegBackend

        expected = segment_scene(lambda im: ClipSegBackend(str(tiny_clipseg)).mask(im, "dog"), stages["stage1"], 256)
        np.testing.assert_array_equal(mask, expected)


def test_finetune_then_infer_save_the_adapter_the_token_and_each_image_with_its_stages(repo_root, example_subject,
                                                                                       tmp_path):
    from subjectops.stages.finetune import finetune
    from subjectops.stages.infer import infer
    from subjectops.stages.refine import refine

    params = alchemy_params(repo_root, "finetune.alchemy.token=immen", "finetune.alchemy.steps=3",
                            "finetune.alchemy.lr=0.05", "finetune.checkpoint_every=0", "finetune.validation_every=0",
                            "infer.strategy=alchemy", "infer.steps=2", "infer.prompt_invariant.num_images=2",
                            "infer.alchemy.strength=0.5")
    refine_dir = refine(params, example_subject, "dog", tmp_path / "refine")
    ft = finetune(params, refine_dir, None, tmp_path / "finetune")
    info = json.loads((ft / "method.json").read_text())
    assert (info["method"], info["identifier"], info["weights"]) == ("alchemy", "immen",
                                                                     ["pytorch_lora_weights.safetensors"])
    recorded = json.loads((ft / "manifest.json").read_text())["alchemy"]
    assert recorded == {"token": "immen", "token_source": "finetune.alchemy.token",
                        "open_in_paper": {"rank": 8, "alpha": 8.0, "lr": 0.05, "steps": 3}}
    out = infer(params, refine_dir, ft, tmp_path / "infer")
    samples = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["a photo of immen dog"] * 2
    for s in samples:
        assert list(s["intermediates"]) == ["stage1", "blurred"] and s["path"].startswith("images/")
        assert all((out / rel).is_file() and rel.startswith("stages/") for rel in s["intermediates"].values())
    assert sorted(p.name for p in (out / "images" / "prompt-invariant").iterdir()) == ["0000.png", "0001.png"]
    inference = json.loads((out / "manifest.json").read_text())["inference"]
    assert inference["strategy"] == "alchemy" and inference["config"]["strength"] == 0.5
    assert inference["config"]["segmenter"] == "grabcut"  # auto, resolved: no CLIPSeg weights on this machine


def test_segmentation_sees_a_downscaled_scene_and_returns_a_mask_of_the_scenes_size():
    seen = []

    class Centre:
        def mask(self, image):
            seen.append(image.size)
            m = np.zeros((image.height, image.width), np.uint8)
            m[image.height // 4: 3 * image.height // 4, image.width // 4: 3 * image.width // 4] = 255
            return Image.fromarray(m)

    mask = segment_scene(Centre().mask, Image.new("RGB", (512, 256)), 128)
    assert seen == [(128, 64)] and mask.shape == (256, 512) and mask.dtype == bool
    assert mask[128, 256] and not mask[0, 0] and mask.sum() == 128 * 256
    segment_scene(Centre().mask, Image.new("RGB", (64, 64)), 128)
    assert seen[-1] == (64, 64)  # never upscaled
