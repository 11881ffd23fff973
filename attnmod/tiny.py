"""Tiny random pipelines with the real topologies, built in-process (tests, demos, benchmarks).

``tiny_sd15`` has SD1.5's block layout (32 attention blocks under SD1.5's names); ``tiny_sdxl`` has
SDXL's (several transformer blocks per attention module, two text encoders, ``text_time``
conditioning). Their CLIP tokenizer is built offline from a generated vocabulary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_clip_tokenizer

WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "cat", "dog", "red", "blue", "green", "photo", "painting", "style", "circle", "square", "star"]


def _tokenizer():
    with tempfile.TemporaryDirectory(prefix="attnmod-tok-") as tmp:  # loaded into memory; nothing left behind
        return build_clip_tokenizer(Path(tmp), WORDS, max_length=16)


def _text_encoder(tokenizer, hidden: int, projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae():
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
    ).eval()


def _scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    """SD1.5 topology at toy width: 32 attention blocks, 32×32 images from 16×16 latents."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 16, 32, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8,
    ).eval()
    tokenizer = _tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, 32), tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL topology at toy width: transformer depths (1, 2, 3) like SDXL's (1, 2, 10), two encoders."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 16, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ).eval()
    tokenizer = _tokenizer()
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, 32), text_encoder_2=_text_encoder(tokenizer, 32, True),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(),
        force_zeros_for_empty_prompt=False,
    )
