"""Single-file (original LDM / "CompVis" layout) checkpoints load offline from a local config folder."""

import numpy as np
import pytest
import torch
from conftest import run
from safetensors.torch import save_file

from attnmod.loading import ModelLoadError, load_pipeline

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_prefixes(config) -> dict[str, str]:
    """diffusers module prefix -> original UNetModel prefix, from the UNet's config (any depth)."""
    layers, n = config.layers_per_block, len(config.block_out_channels)
    out = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
           "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
           "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
           "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
        has_attention = config.up_block_types[i].startswith("CrossAttn")
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
        if i < n - 1:
            out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attention else 1}."
    return out


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        prefix = next(p for p in prefixes if key.startswith(p))
        rest = key[len(prefix):]
        if ".resnets." in prefix:  # a resnet's inner names differ too (norm1 -> in_layers.0, ...)
            head, _, tail = rest.partition(".")
            rest = f"{RESNET[head]}.{tail}"
        out["model.diffusion_model." + prefixes[prefix] + rest] = value
    return out


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, new in VAE_ATTN.items():
                k = k.replace(f"attn_1.{old}.", f"attn_1.{new}.")
            if value.ndim == 2:
                value = value[:, :, None, None]  # a Linear in diffusers, a 1x1 conv in the original
        for i in range(n):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        out["first_stage_model." + k] = value
    return out


def write_original_checkpoint(pipe, path) -> None:
    """The tiny SD1.5 pipeline as one original-format file (UNet, VAE, CLIP text encoder)."""
    text = {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in pipe.text_encoder.state_dict().items()}  # newer transformers drop the text_model level
    tensors = {**unet_to_original(pipe.unet), **vae_to_original(pipe.vae), **text}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def test_single_file_loads_offline_with_a_local_config(sd, sd_folder, tmp_path):
    path = tmp_path / "tiny-sd15.safetensors"
    write_original_checkpoint(sd, path)
    pipe = load_pipeline(str(path), config=str(sd_folder), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):  # every weight came back where it belongs
        mine, theirs = getattr(pipe, name).state_dict(), getattr(sd, name).state_dict()
        assert set(mine) >= {k for k in theirs if "position_ids" not in k}
        assert all(torch.equal(mine[k], v) for k, v in theirs.items() if k in mine)
    assert np.array_equal(run(pipe), run(sd))


def test_single_file_without_a_config_says_what_to_pass(sd, tmp_path):
    path = tmp_path / "tiny-sd15.safetensors"
    write_original_checkpoint(sd, path)
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(str(path), device="cpu")
    message = str(info.value)
    assert "--config" in message and "\n" not in message
