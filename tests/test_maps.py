import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

from attnmod.attention import explicit_attention
from attnmod.blocks import list_blocks
from attnmod.maps import trace


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_explicit_attention_equals_the_stock_processors(name, request):
    pipe = request.getfixturevalue(name)
    names = [b.name for b in list_blocks(pipe.unet)]
    before = dict(pipe.unet.attn_processors)
    stock_image = run(pipe)
    seen = []
    with explicit_attention(pipe.unet, {n: (lambda call, p: seen.append(call.name)) for n in names}):
        explicit_image = run(pipe)
    assert np.abs(explicit_image - stock_image).max() < 1e-4
    assert set(seen) == set(names)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())  # exactly what was found
    assert np.array_equal(run(pipe), stock_image)


def test_explicit_unet_output_matches_stock_within_1e_4(sd):
    torch.manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 32)
    with torch.no_grad():
        stock = sd.unet(sample, 10, context).sample
        with explicit_attention(sd.unet, {b.name: (lambda call, p: None) for b in list_blocks(sd.unet)}):
            explicit = sd.unet(sample, 10, context).sample
    assert (explicit - stock).abs().max() < 1e-4


def test_trace_aggregates_maps_and_restores(sd):
    before = dict(sd.unet.attn_processors)
    with trace(sd, steps=(1, 3)) as tc:
        image = run(sd, prompt="a red cat", steps=4)
    maps = tc.result("a red cat")
    assert sd.unet.attn_processors == before
    assert maps.cross.shape == (1, 16, 16, 16)  # (images, latent H, W, tokens): CFG's conditional half only
    assert maps.self_maps.shape == (1, 256, 256) and maps.self_resolution == (16, 16)
    rows = maps.self_maps[0].sum(-1)  # each softmax row sums to 1: rows sum to heads x steps x blocks
    heads = sd.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1").heads
    heads_steps_blocks = heads * 2 * 5  # steps 1-2; self blocks at 16x16: D0A0, D0A1, U3A0, U3A1, U3A2
    assert torch.allclose(rows, torch.full_like(rows, heads_steps_blocks))
    m = maps.word_map("cat")
    assert m.shape == (16, 16) and float(m.min()) == 0 and float(m.max()) == pytest.approx(1)
    pil = Image.fromarray((image[0] * 255).astype(np.uint8))
    assert maps.overlay(pil, "cat").size == pil.size
    assert maps.self_attention_pca().size == (16, 16)
    with pytest.raises(ValueError, match="tokens are: a red cat"):
        maps.word_map("dog")


def test_words_split_into_several_tokens_are_found_whole():
    from attnmod.tokenizer import split_words, word_positions

    tokens = ["<|startoftext|>", "a</w>", "cyber", "punk</w>", "cat</w>", "<|endoftext|>", "<|endoftext|>"]
    assert split_words(tokens) == [("a", [1]), ("cyberpunk", [2, 3]), ("cat", [4])]
    assert word_positions(tokens, "CyberPunk") == [2, 3] and word_positions(tokens, "punk") == []


def test_word_maps_of_a_word_the_tokenizer_splits(sd):
    prompt = "a red zebra"  # the tiny tokenizer spells "zebra" out: z e b r a</w>
    assert sd.tokenizer.tokenize(prompt)[2:] == ["z", "e", "b", "r", "a</w>"]
    with trace(sd, blocks="cross", self_attention=False) as tc:
        run(sd, prompt=prompt, steps=2)
    maps = tc.result(prompt)
    assert maps.token_index("zebra") == [3, 4, 5, 6, 7] and maps.token_index("a") == [1]  # not zebr-"a"
    m = maps.cross[0][..., 3:8].sum(-1)
    assert torch.allclose(maps.word_map("zebra"), (m - m.min()) / (m.max() - m.min() + 1e-8), atol=1e-5)
    with pytest.raises(ValueError, match="tokens are: a red zebra"):
        maps.word_map("zeb")


def test_kept_maps_select_steps_and_blocks(sd):
    with trace(sd, blocks="cross", steps=(1, 4)) as tc:
        run(sd, prompt="a red cat", steps=4)
    with trace(sd, blocks="cross", steps=(1, 4), keep=True) as kept:
        run(sd, prompt="a red cat", steps=4)
    maps = kept.result("a red cat")
    assert torch.equal(maps.cross, tc.result().cross)  # keeping changes nothing in the aggregate
    assert {s for s, _ in maps.kept} == {1, 2, 3}
    assert {b for _, b in maps.kept} == {b.short for b in list_blocks(sd.unet) if b.kind == "cross"}
    assert torch.allclose(maps.select().cross, maps.cross, atol=1e-5)
    parts = maps.select(steps=[1]).cross + maps.select(steps=[2, 3]).cross
    assert torch.allclose(parts, maps.cross, atol=1e-5)
    up = maps.select(blocks="U*")
    assert torch.allclose(up.cross + maps.select(blocks=["D*", "M*"]).cross, maps.cross, atol=1e-5)
    assert up.word_map("cat").shape == (16, 16) and not torch.equal(up.cross, maps.cross)
    with pytest.raises(ValueError, match="kept steps 1..3"):
        maps.select(steps=[0])
    with pytest.raises(ValueError, match="keep=True"):
        tc.result().select(blocks="U*")


def test_trace_builds_probabilities_only_where_they_are_kept(sd, monkeypatch):
    import attnmod.attention as attention

    built = []  # (is_cross, query tokens) of every call that materialised the probabilities
    original = attention.attention_probs

    def spy(query, key, *args, **kwargs):
        built.append((key.shape[2] != query.shape[2] or key.shape[2] == 16, query.shape[2]))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(attention, "attention_probs", spy)
    with trace(sd, steps=(1, 3)) as tc:
        run(sd, prompt="a red cat", steps=4)
    assert tc.self_resolution == (16, 16)
    self_tokens = {n for cross, n in built if not cross}
    assert self_tokens == {256}  # self-attention at 8x8 (64 tokens) and outside steps 1-2 ran the fused kernel
    cross_blocks = sum(b.kind == "cross" for b in list_blocks(sd.unet))
    assert len(built) == 2 * (cross_blocks + 5)  # 2 active steps x (every cross block + 5 self blocks at 16x16)


def test_trace_without_a_run_is_a_clear_error(sd):
    with trace(sd, blocks="cross") as tc:
        pass
    with pytest.raises(ValueError, match="nothing was captured"):
        tc.result("a red cat")


def synthetic_maps():
    """4x4 patches: the left half attends to itself, the right half to itself; 'cat' looks left, 'dog' right."""
    from attnmod.maps import AttentionMaps

    side = torch.arange(16) % 4 >= 2  # (16,) True on the right half
    self_maps = (side[:, None] == side[None, :]).float()[None]  # (1, 16, 16)
    cross = torch.zeros(1, 4, 4, 5)
    cross[0, :, :2, 2] = 1.0  # token 2 = cat: left
    cross[0, :, 2:, 4] = 1.0  # token 4 = dog: right
    cross[0, :, :, 3] = 0.5  # token 3 = and: everywhere
    tokens = [["<|startoftext|>", "a</w>", "cat</w>", "and</w>", "dog</w>"]]
    return AttentionMaps(cross, self_maps, (4, 4), tokens)


def test_segment_scores_are_mass_shares():
    from attnmod.segment import segment_scores

    labels = torch.tensor([0] * 12 + [1] * 4)  # a large background segment and a small object segment
    cross = torch.full((2, 16), 0.1)
    cross[0, 12:] = 0.6  # the object word: concentrated on the object
    scores = segment_scores(cross, labels, 2)  # (k, T)
    assert scores.shape == (2, 2) and torch.allclose(scores.sum(0), torch.ones(2))
    assert scores[1, 0] == pytest.approx(2.4 / 3.6) and scores[1, 1] == pytest.approx(0.25)
    assert scores[1, 0] > scores[1, 1]  # the object segment is labelled with the object word
    assert segment_scores(cross, labels, 3)[2].eq(0).all()  # an empty segment scores 0


def test_self_segmentation_separates_and_labels_segments():
    from attnmod.segment import self_segmentation

    seg = self_segmentation(synthetic_maps(), k=2)
    left, right = int(seg.labels[0, 0]), int(seg.labels[0, 3])
    assert left != right
    assert (seg.labels[:, :2] == left).all() and (seg.labels[:, 2:] == right).all()
    assert seg.label(left) == "cat" and seg.legend[left][0][1] == pytest.approx(1.0)
    assert seg.label(right) == "dog"
    assert dict(seg.legend[left])["and"] == pytest.approx(0.5)  # a flat map: half its mass in each half
    assert dict(seg.legend[left])["dog"] == 0.0 and dict(seg.legend[right])["dog"] == pytest.approx(1.0)
    assert seg.image().width > 256
    with pytest.raises(ValueError, match="k=17 segments but the map has 16 patches"):
        self_segmentation(synthetic_maps(), k=17)


def test_self_segmentation_labels_with_chosen_words_only():
    from attnmod.segment import self_segmentation

    maps = synthetic_maps()
    maps.cross[0, :, 2:, 2] = 0.5  # "cat" now leaks to the right ...
    maps.cross[0, :, 2:, 3] = 0.0  # ... and "and" looks only left: it concentrates there more than "cat"
    everything = self_segmentation(maps, k=2)
    left = int(everything.labels[0, 0])
    assert everything.label(left) == "and"
    nouns = self_segmentation(maps, k=2, words=["cat", "dog", "cat"])  # duplicates count once
    assert nouns.label(left) == "cat" and [w for w, _ in nouns.legend[left]] == ["cat", "dog"]
    assert torch.equal(nouns.labels, everything.labels)  # the words change the labels, not the segments
    with pytest.raises(ValueError, match="'bird' is not in the prompt; its tokens are: a cat and dog"):
        self_segmentation(maps, k=2, words=["cat", "bird"])


def test_maps_cli_writes_word_maps_pca_and_segments(sd_folder, tmp_path, capsys):
    from attnmod.cli import main

    out = tmp_path / "maps"
    assert main(["maps", "--model", str(sd_folder), "--prompt", "a red cat", "--steps", "3", "--size", "32x32",
                 "--segments", "3", "--out", str(out)]) == 0
    for name in ("image.png", "words.png", "self-attention-pca.png", "segments.png"):
        assert (out / name).exists(), name
    assert "segment 0:" in capsys.readouterr().out
    assert main(["maps", "--model", str(sd_folder), "--prompt", "a red cat", "--steps", "2", "--size", "32x32",
                 "--segments", "2", "--label-words", "cat", "--out", str(tmp_path / "nouns")]) == 0
    printed = capsys.readouterr().out
    assert "segment 1: cat" in printed and "red" not in printed
    assert main(["maps", "--model", str(sd_folder), "--prompt", "a red cat", "--steps", "2", "--size", "32x32",
                 "--label-words", "dog", "--out", str(tmp_path / "dog")]) == 2
    assert "'dog' is not in the prompt" in capsys.readouterr().err
    assert main(["maps", "--model", str(sd_folder), "--prompt", "a red cat", "--steps", "2", "--size", "32x32",
                 "--segments", "999", "--out", str(tmp_path / "bad")]) == 2
    assert "patches" in capsys.readouterr().err
