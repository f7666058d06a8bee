"""How the tiny presets (`subjectops.models.tiny`) are built: seeded random weights in SD 1.x and SDXL shapes,
saved in diffusers format so they load through the same `from_pretrained` path as real models."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from subjectops.models.tokenizer import train_clip_bpe


def _scheduler() -> DDIMScheduler:
    # Stable Diffusion's noise schedule (scaled_linear 0.00085..0.012, 1000 steps).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _vae(channels=(32, 32, 64, 64), layers: int = 1, sample_size: int = 64) -> AutoencoderKL:
    # Four blocks: an 8x downsampling VAE, like SD's.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
    )


def _text_config(vocab_size: int, projection_dim: int | None = None, hidden: int = 32,
                 layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37 if hidden == 32 else 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim or 32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_tiny(preset: str, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tok_dir = train_clip_bpe(out / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    if preset in ("tiny-sd15", "small-sd15"):
        pipe = _sd15_shaped(tokenizer, small=preset == "small-sd15")
    else:
        pipe = _sdxl_shaped(tokenizer, tok_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    # Store tokenizers as the real SD repositories do (CLIP's vocab.json + merges.txt, no tokenizer.json),
    # so loading exercises the same files a downloaded model has.
    for sub in ("tokenizer", "tokenizer_2"):
        if (out / sub).exists():
            (out / sub / "tokenizer.json").unlink(missing_ok=True)
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(tok_dir / name, out / sub / name)
    shutil.rmtree(tok_dir)
    return out


def _sd15_shaped(tokenizer: CLIPTokenizer, small: bool) -> StableDiffusionPipeline:
    """tiny-sd15 (or small-sd15): SD 1.x's layout at a fraction of its width, random weights (the seed set before)."""
    vocab = len(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=16 if small else 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256) if small else (32, 64),
        layers_per_block=2 if small else 1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D") if small
        else ("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D") if small
        else ("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64 if small else 32,
        attention_head_dim=8 if small else 4,
        norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=_vae((64, 128, 128, 128), 2, 128) if small else _vae(),
        text_encoder=CLIPTextModel(_text_config(vocab, hidden=64, layers=4) if small else _text_config(vocab)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_shaped(tokenizer: CLIPTokenizer, tok_dir: Path) -> StableDiffusionXLPipeline:
    """tiny-sdxl: SDXL's layout (two text encoders, added conditions) at a fraction of its width, random weights."""
    vocab = len(tokenizer)
    # SDXL shape: two text encoders (hidden 32 each, concatenated to 64 for cross-attention) and
    # "text_time" added conditions: 6 time ids x 8 dims + the pooled projection (32) = 80.
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,
        norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(vocab)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
