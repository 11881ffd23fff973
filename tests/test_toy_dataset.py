import numpy as np
import pytest

from attnmod.toy import dataset


def test_deterministic_for_a_seed():
    a, b, c = dataset.sample(7), dataset.sample(7), dataset.sample(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(20))
def test_caption_parses_back_to_attributes(seed):
    s = dataset.sample(seed)
    p = dataset.parse_caption(s.caption)
    assert p.objects == s.scene.objects
    assert (p.background, p.pattern, p.style) == (s.scene.background, s.scene.pattern, s.scene.style)


def test_short_captions_parse_with_none():
    p = dataset.parse_caption("a small blue star at the top, shaded style")
    assert p.objects == (dataset.Obj("star", "blue", "small", "top"),)
    assert p.background is None and p.style == "shaded"


@pytest.mark.parametrize("seed", range(12))
def test_masks_cover_the_drawn_objects(seed):
    s = dataset.sample(seed)
    assert len(s.masks) == len(s.scene.objects)
    assert not (s.masks[0] & s.masks[-1]).any() or len(s.masks) == 1
    for obj, mask in zip(s.scene.objects, s.masks, strict=True):
        assert mask.sum() > 40
        inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        pix = s.image[inner].astype(float)  # edge pixels are anti-aliased blends
        color = np.array(dataset.COLORS[obj.color], float)
        # the object's own colour (or its shaded/outlined variant) dominates inside the mask
        cos = pix @ color / (np.linalg.norm(pix, axis=1) * np.linalg.norm(color) + 1e-6)
        dark = pix.max(1) < 60  # outline
        assert np.mean((cos > 0.97) | dark) > 0.9, obj
    grown = s.masks.any(0)
    grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0) | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
    outside = ~grown
    bg = np.array(dataset.COLORS[s.scene.background], float)
    pix = s.image[outside].astype(float)
    cos = pix @ bg / (np.linalg.norm(pix, axis=1) * np.linalg.norm(bg) + 1e-6)
    assert np.mean(cos > 0.97) > 0.9


def test_object_colours_differ_from_background_and_each_other():
    for seed in range(200):
        sc = dataset.sample(seed).scene
        colors = [o.color for o in sc.objects] + [sc.background]
        assert len(set(colors)) == len(colors)
        if len(sc.objects) == 2:
            assert {o.position for o in sc.objects} in ({"left", "right"}, {"top", "bottom"})


def test_unknown_words_list_the_vocabulary():
    with pytest.raises(ValueError) as e:
        dataset.check_prompt("a large red dog on the left")
    msg = str(e.value)
    assert "dog" in msg and all(w in msg for w in dataset.vocabulary())
    assert dataset.check_prompt("a large red circle on the left") == "a large red circle on the left"


def test_palette_is_well_separated():
    cols = np.array(list(dataset.COLORS.values()), float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 1e9
    assert d.min() > 90
