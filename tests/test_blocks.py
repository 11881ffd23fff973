import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from attnmod.blocks import full_name, list_blocks, resolve_blocks, short_name

CONFIGS = Path(__file__).parents[1] / "attnmod" / "configs"


def meta_unet(name):
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(json.loads((CONFIGS / f"{name}_unet.json").read_text()))


@pytest.fixture(scope="module")
def real_sd15():
    return meta_unet("sd15")


@pytest.fixture(scope="module")
def real_sdxl():
    return meta_unet("sdxl")


def test_real_topologies_have_the_papers_block_counts(real_sd15, real_sdxl):
    assert len(list_blocks(real_sd15)) == 32
    assert len(list_blocks(real_sdxl)) == 140
    assert len({b.short for b in list_blocks(real_sdxl)}) == 140


def test_paper_examples(real_sd15, real_sdxl):
    names = {b.short: b.name for b in list_blocks(real_sd15)}
    assert names["U1A1A2"] == "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert names["M0A0A1"] == "mid_block.attentions.0.transformer_blocks.0.attn1"
    xl = {b.short: b.name for b in list_blocks(real_sdxl)}
    assert xl["U0A1T3A2"] == "up_blocks.0.attentions.1.transformer_blocks.3.attn2"
    assert "U0A1A2" not in xl  # several transformer blocks: the T index is required


@pytest.mark.parametrize("fixture", ["real_sd15", "real_sdxl", "sd", "sdxl"])
def test_short_full_round_trip_for_every_block(fixture, request):
    unet = getattr(request.getfixturevalue(fixture), "unet", request.getfixturevalue(fixture))
    for block in list_blocks(unet):
        assert full_name(block.short) == block.name
        assert short_name(block.name, 1 if "T" not in block.short[1:] else 2) == block.short
        for selector in (block.short, block.name, block.processor_key, block.short.lower()):
            assert resolve_blocks(unet, selector) == [block]
        assert block.kind == ("cross" if block.name.endswith("attn2") else "self")


def test_groups_globs_and_joins(sd):
    assert len(resolve_blocks(sd, "all")) == 32
    assert len(resolve_blocks(sd, "self")) == len(resolve_blocks(sd, "cross")) == 16
    assert [b.short for b in resolve_blocks(sd, "U*A2")] == [f"U{u}A{a}A2" for u in (1, 2, 3) for a in range(3)]
    assert [b.short for b in resolve_blocks(sd, "D1*")] == ["D1A0A1", "D1A0A2", "D1A1A1", "D1A1A2"]
    assert [b.short for b in resolve_blocks(sd, "M0A0A1+M0A0A2")] == ["M0A0A1", "M0A0A2"]
    assert [b.short for b in resolve_blocks(sd, "U1A1T0A2")] == ["U1A1A2"]  # explicit T0 is fine
    assert len(resolve_blocks(sd, "up_blocks.1.*")) == 6


def test_unknown_names_list_the_closest(sd, sdxl):
    with pytest.raises(ValueError, match="U1A1A2"):
        resolve_blocks(sd, "U1A1A3")
    with pytest.raises(ValueError, match="closest"):
        resolve_blocks(sd, "X*")
    with pytest.raises(ValueError, match="U0A1T0A2"):  # SDXL names need T: suggest them
        resolve_blocks(sdxl, "U0A1A2")
    with pytest.raises(ValueError):
        full_name("Q1A1A2")


def test_downsampling_factors_per_block(sd, sdxl):
    from attnmod.blocks import downsampling

    sd15 = {short_name(n): f for n, f in downsampling(sd.unet).items()}
    assert len(sd15) == 32 and sd15["D0A0A1"] == 1 and sd15["D1A1A2"] == 2 and sd15["D2A0A2"] == 4
    assert sd15["M0A0A1"] == 8 and sd15["U1A2A2"] == 4 and sd15["U2A0A1"] == 2 and sd15["U3A2A2"] == 1
    xl = downsampling(sdxl.unet)
    assert set(xl) == {b.name for b in list_blocks(sdxl)}
    assert xl["down_blocks.1.attentions.0.transformer_blocks.1.attn2"] == 2
    assert xl["mid_block.attentions.0.transformer_blocks.2.attn1"] == 4
    assert xl["up_blocks.0.attentions.2.transformer_blocks.2.attn1"] == 4
    assert xl["up_blocks.1.attentions.0.transformer_blocks.0.attn1"] == 2
    assert downsampling(torch.nn.Linear(2, 2)) == {}
