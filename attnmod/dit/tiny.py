"""Tiny random SD3 and FLUX pipelines built in-process (tests, demos, benchmarks); no downloads.

``tiny_sd3`` has SD3's joint blocks (the last one without text output) and one SD3.5-medium dual layer
(an image-only ``attn2``); it runs without T5 (``text_encoder_3=None``: the T5 part of the prompt is zeros).
``tiny_flux`` has FLUX's double- and single-stream blocks and a tiny T5 whose tokenizer is built in memory
from a word list (a Unigram vocabulary: no sentencepiece, no protobuf). 32×32 images, 8×8 image tokens.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import T5Config, T5EncoderModel

from ..tiny import WORDS, _text_encoder, _tokenizer

T5_TOKENS = 32  # FLUX's T5 sequence length in the tiny pipeline (``max_sequence_length`` of its calls)


def t5_tokenizer(words=WORDS):
    """A T5 tokenizer whose vocabulary is ``words`` (one token each, as ``▁word``) plus single letters."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789,.-'!?"
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in dict.fromkeys(words)]
             + [("▁", -3.0)] + [(c, -5.0) for c in letters])
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = T5_TOKENS
    return tok


def _vae(latent_channels: int = 4):
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=8,
        layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5,
    ).eval()


def tiny_sd3(seed: int = 0, layers: int = 3) -> StableDiffusion3Pipeline:
    """SD3 topology at toy width: ``layers`` joint blocks (J0 with SD3.5's dual ``attn2``), two CLIP encoders."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=64, pooled_projection_dim=64,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    tokenizer = _tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
        text_encoder=_text_encoder(tokenizer, 32, True), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, 32, True), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0, layers: int = 2, single_layers: int = 2) -> FluxPipeline:
    """FLUX topology at toy width: double- and single-stream blocks, CLIP + tiny T5, no guidance embedding."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4],
    ).eval()
    tokenizer, t5_tok = _tokenizer(), t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
        text_encoder=_text_encoder(tokenizer, 32), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tok,
    )
    pipe.default_sample_size = 16  # native 32×32 images (FLUX's own default is 128 latents)
    pipe.set_progress_bar_config(disable=True)
    return pipe
