from dataclasses import replace

import pytest
import torch

from attnmod.toy import dataset
from attnmod.toy.grounding import (
    grounded_maps,
    grounding_targets,
    object_token_positions,
    pixel_loss,
    token_loss,
)
from attnmod.toy.model import TINY
from attnmod.toy.train import TrainConfig, train


def _ids(tokenizer, caption):
    return tokenizer(caption, padding="max_length", max_length=32, return_tensors="pt").input_ids


def test_object_tokens_are_the_size_colour_and_shape_words():
    from transformers import CLIPTokenizer

    from attnmod.toy.model import SHIPPED

    tok = CLIPTokenizer.from_pretrained(SHIPPED, subfolder="tokenizer")
    seed = next(i for i in range(100) if len(dataset.sample(i).scene.objects) == 2)  # as the cache draws them
    s = dataset.sample(seed)
    ids = _ids(tok, s.caption)[0].tolist()
    comma = tok.convert_tokens_to_ids(",</w>")
    words = tok.convert_ids_to_tokens(ids)
    for obj, positions in zip(s.scene.objects, object_token_positions(ids, comma, 2), strict=True):
        assert [words[p].removesuffix("</w>") for p in positions] == [obj.size, obj.color, obj.shape]
    rows, pos, masks = grounding_targets([seed, seed], _ids(tok, [s.caption] * 2), torch.tensor([True, False]), comma, (16, 16))
    assert rows.tolist() == [0] * 6 and masks.shape == (6, 256)  # the dropped caption grounds nothing
    assert torch.allclose(masks[0].sum() * 16, torch.tensor(float(s.masks[0].sum())), atol=1e-3)


def test_token_loss_is_zero_inside_the_mask_and_grows_outside():
    masks = torch.zeros(1, 4)
    masks[0, :2] = 1.0
    inside = torch.zeros(1, 2, 4, 3)  # (B, heads, patches, tokens): token 1 attends only to patches 0-1
    inside[0, :, :2, 1] = 0.5
    outside = torch.zeros(1, 2, 4, 3)
    outside[0, :, 2:, 1] = 0.5
    rows, positions = torch.tensor([0]), torch.tensor([1])

    def loss(probs):
        return token_loss(grounded_maps(probs, rows, positions), masks)

    assert grounded_maps([inside], rows, positions).tolist() == [[0.5, 0.5, 0.0, 0.0]]
    assert loss([inside]) == pytest.approx(0.0)
    assert loss([outside]) == pytest.approx(1.0)
    assert loss([inside, outside]) == pytest.approx(0.25)  # blocks averaged


def test_pixel_loss_wants_the_whole_patch_inside_and_nothing_outside():
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # the token loss cannot tell these apart (all mass inside); the pixel term prefers the larger share
    weak, strong = torch.tensor([[0.1, 0.1, 0.0, 0.0]]), torch.tensor([[0.9, 0.9, 0.0, 0.0]])
    assert token_loss(weak, masks) == pytest.approx(0.0) and token_loss(strong, masks) == pytest.approx(0.0)
    assert pixel_loss(strong, masks) < pixel_loss(weak, masks)
    assert pixel_loss(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), masks) < 1e-5
    leaking = torch.tensor([[0.9, 0.9, 0.5, 0.0]])
    assert pixel_loss(leaking, masks) > pixel_loss(strong, masks)


def test_training_with_grounding_logs_it_and_resumes_bit_exactly(tmp_path):
    cfg = TrainConfig(model=TINY, vae_steps=1, vae_batch=2, cache_size=4, steps=3, batch=2, ckpt_every=1,
                      export_every=100, keep_every=0, ground_from=1, ground_pixel_weight=0.05, decoder_steps=0)
    logs = []
    train(cfg, tmp_path / "a", export_to=None, progress=False, callback=logs.append)
    unet = [i for i in logs if i["phase"] == "unet"]
    assert "grounding_loss" not in unet[0] and all(i["grounding_loss"] > 0 for i in unet[1:])
    train(replace(cfg, steps=2), tmp_path / "b", export_to=None, progress=False)
    train(cfg, tmp_path / "b", export_to=None, progress=False)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])
