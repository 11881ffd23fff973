"""segment.object_mask: the object's mask for masked AdaIN (benchmarks/segment_eval.py measures it on the toy)."""

import pytest
import torch
from conftest import run

from attnmod.maps import AttentionMaps, trace
from attnmod.segment import object_mask

CAT = torch.tensor([[0, 0, 0, 0],
                    [0, 1, 1, 0],
                    [0, 1, 1, 0],
                    [0, 0, 0, 0]], dtype=torch.bool)  # the object: the centre 2x2 patches of a 4x4 grid


def mixed_maps(cross_side: int = 4) -> AttentionMaps:
    """4x4 self-attention patches in three groups that attend only within themselves: the object (CAT), the
    left and the right of the background (a two-tone pattern). 'cat' (token 2) looks at the object, weakly
    at its bottom-right patch (0.1) and faintly at one background patch (0.2); 'and' (token 3) is flat."""
    group = torch.ones(4, 4, dtype=torch.long)  # (4, 4): 0 left background, 1 right background, 2 object
    group[:, :2] = 0
    group[CAT] = 2
    g = group.flatten()
    self_maps = (g[:, None] == g[None, :]).float()[None]  # (1, 16, 16)
    cat = CAT.float()
    cat[2, 2] = 0.1  # an object patch the word barely reaches
    cat[0, 3] = 0.2  # a background patch it leaks to
    cross = torch.zeros(1, 4, 4, 5)
    cross[0, ..., 2] = cat
    cross[0, ..., 3] = 0.5
    if cross_side != 4:  # the latent at twice the self-attention's resolution
        cross = cross.repeat_interleave(cross_side // 4, 1).repeat_interleave(cross_side // 4, 2)
    tokens = [["<|startoftext|>", "a</w>", "cat</w>", "and</w>", "dog</w>"]]
    return AttentionMaps(cross, self_maps, (4, 4), tokens)


def test_object_mask_thresholds_the_scaled_word_map():
    mask = object_mask(mixed_maps(), "cat")  # scaled map: 1 on three object patches, 0.1, 0.2, else 0
    expected = CAT.clone()
    expected[2, 2] = False  # 0.1 < 0.3
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    leaky = expected.clone()
    leaky[0, 3] = True  # 0.2 > 0.15
    assert torch.equal(object_mask(mixed_maps(), "cat", threshold=0.15), leaky)
    assert torch.equal(object_mask(mixed_maps(), "cat", threshold=2.0), expected)  # never empty: the peak stays
    assert object_mask(mixed_maps(), "and").all()  # a flat map: no patch stands out, all are kept


def test_object_mask_merges_self_attention_segments_by_the_word_map():
    # k=3 recovers the three groups; the object group's mean scaled map is (1 + 1 + 1 + 0.1) / 4 = 0.775 > 0.3,
    # the right background's 0.2 / 8 = 0.025: the weak object patch joins, the leaky background patch does not
    assert torch.equal(object_mask(mixed_maps(), "cat", k=3), CAT)
    assert torch.equal(object_mask(mixed_maps(), "cat", k=3, threshold=0.9), CAT)  # the best segment at least
    assert object_mask(mixed_maps(), "cat", k=1).all()  # one segment: everything


def test_object_mask_is_at_the_latent_resolution():
    big = CAT.repeat_interleave(2, 0).repeat_interleave(2, 1)  # (8, 8)
    assert torch.equal(object_mask(mixed_maps(8), "cat", k=3), big)  # self-attention 4x4 -> cross 8x8
    assert object_mask(mixed_maps(8), "cat").shape == (8, 8)
    with pytest.raises(ValueError, match="'bird' is not in the prompt"):
        object_mask(mixed_maps(), "bird")


def test_object_mask_on_traced_maps(sd):
    with trace(sd) as tc:
        run(sd, prompt="a red cat", steps=2)
    maps = tc.result("a red cat")
    for k in (None, 4):
        mask = object_mask(maps, "cat", k=k)
        assert mask.shape == maps.cross.shape[1:3] and mask.dtype == torch.bool and mask.any()
