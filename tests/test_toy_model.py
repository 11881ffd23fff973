"""The shipped toy model: a plain diffusers SD folder with SD1.5's attention-block names."""

import os

import pytest
import torch

from attnmod.toy.dataset import vocabulary
from attnmod.toy.model import SHIPPED, TINY, build

SD15_BLOCKS = (
    [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
    + [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)]
    + ["mid_block.attentions.0"]
)
SD15_PROCESSORS = {f"{blk}.transformer_blocks.0.{attn}.processor" for blk in SD15_BLOCKS for attn in ("attn1", "attn2")}


def test_built_unet_has_sd15_attention_names():
    c = build(TINY)
    assert set(c.unet.attn_processors) == SD15_PROCESSORS and len(SD15_PROCESSORS) == 32


def test_tokenizer_is_word_level():
    tok = build(TINY).tokenizer
    assert all(len(tok.tokenize(w)) == 1 for w in vocabulary())


@pytest.fixture(scope="module")
def shipped():
    from diffusers import StableDiffusionPipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED)  # plain diffusers, no attnmod code path
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_loads_offline_with_plain_diffusers(shipped):
    assert set(shipped.unet.attn_processors) == SD15_PROCESSORS
    assert type(shipped.scheduler).__name__ == "DDIMScheduler"
    assert shipped.scheduler.config.prediction_type == "v_prediction"
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 40 * 2**20
    assert not list(SHIPPED.rglob("*.bin")), "weights must be safetensors"


def test_shipped_model_generates_64px(shipped):
    img = shipped("a large red circle in the center", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)


def test_shipped_tokenizer_has_slow_files_that_agree():
    from transformers import CLIPTokenizer

    folder = SHIPPED / "tokenizer"
    slow = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    fast = CLIPTokenizer.from_pretrained(folder)
    text = "a large red circle on the left, a small blue star on the right, on a striped yellow background, outlined style"
    assert slow(text).input_ids == fast(text).input_ids
    assert all(len(slow.tokenize(w)) == 1 for w in vocabulary())
