"""Architectures of the world's models: the SD-1.x- and SDXL-shaped pipeline parts, the two in-world CLIPs
(the generator's text encoder comes from one, the CLIP-I/CLIP-T metric from the other: another seed and
another architecture) and the DINO-role ViT. Widths are our choice, sized to train on two CPU cores
(measured: see UNET_LAYOUT)."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, ViTConfig

from subjectops.world.draw import SIZE

LATENT = SIZE // 4  # three VAE blocks: a 4x downsampling (SD's four give 8x at 512 px; 64 px needs finer)
TEXT_DIM = 128
SDXL_POOLED = 128
SDXL_TIME_DIM = 8


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=SIZE,
    )


def scheduler() -> DDIMScheduler:
    # Stable Diffusion's noise schedule (scaled_linear 0.00085..0.012, 1000 steps)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def clip_config(vocab: int, kind: str) -> CLIPConfig:
    """kind: 'generator' (its text tower conditions the UNet) or 'metric' (CLIP-I, CLIP-T)."""
    # the generator's vision tower only teaches its text tower, so it is kept small
    generator = kind == "generator"
    text_width, text_layers, vision_width, vision_layers = (TEXT_DIM, 4, 64, 3) if generator else (96, 2, 96, 3)
    text = dict(vocab_size=vocab, hidden_size=text_width, intermediate_size=4 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=4, max_position_embeddings=77,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=TEXT_DIM)
    vision = dict(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
                  num_attention_heads=4, image_size=SIZE, patch_size=8, projection_dim=TEXT_DIM)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=TEXT_DIM)


def dino_config() -> ViTConfig:
    return ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                     image_size=SIZE, patch_size=8)


# The two UNets' shared layout: three levels, each with cross-attention (our widths, see the module doc).
# Width sits in the 8x8 and 4x4 levels, where class and scene are decided, since compute here is dominated by
# the 16x16 level: (32, 128, 256) costs 1.7x the time of (32, 64, 128) per step for 5x the parameters
# (measured: 0.53 vs 0.32 s per batch of 32), and the smaller layout stalled near 40% class accuracy.
# attention_head_dim is diffusers' legacy name for the number of heads: 8-dim heads at 16x16, 16 and 32 below.
UNET_LAYOUT = dict(
    sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(32, 128, 256), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(4, 8, 8), norm_num_groups=32,
)


def unet_sd15() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_LAYOUT, cross_attention_dim=TEXT_DIM)


def unet_sdxl() -> UNet2DConditionModel:
    # SDXL's conditioning: both encoders' penultimate states concatenated (cross-attention 2 x 128) and
    # "text_time": 6 time ids x 8 dims + encoder 2's pooled projection (128).
    return UNet2DConditionModel(
        **UNET_LAYOUT, cross_attention_dim=2 * TEXT_DIM, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM, projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_POOLED,
    )
