from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attnmod.toy import dataset, evaluate


@pytest.mark.parametrize("n_objects", [1, 2])
def test_analyzer_passes_ground_truth_images(n_objects):
    results = []
    for i in range(40):
        s = dataset.sample(30_000_000 + i, n_objects)
        results.append(evaluate.analyze(s.image, s.scene))
    acc = evaluate.accuracy(results)
    assert min(acc.values()) >= 0.95, acc


def test_analyzer_catches_a_wrong_prompt():
    s = dataset.sample(5, 1)
    obj = s.scene.objects[0]
    other = next(c for c in dataset.COLORS if c not in (obj.color, s.scene.background))
    wrong = dataset.Scene((dataset.Obj(obj.shape, other, obj.size, obj.position),), s.scene.background,
                          s.scene.pattern, s.scene.style)
    assert evaluate.analyze(s.image, wrong)["color"] == [False]


def test_eval_scenes_are_held_out_and_deterministic():
    a, b = evaluate.eval_scenes(5, 1), evaluate.eval_scenes(5, 1)
    assert a == b and all(len(s.objects) == 1 for s in a)
    assert evaluate.EVAL_SEED0 >= 10_000_000


def test_flat_image_has_no_objects():
    img = np.zeros((64, 64, 3), np.uint8) + np.array(dataset.COLORS["blue"], np.uint8)
    scene = dataset.Scene((dataset.Obj("circle", "red", "large", "center"),), "blue", "plain", "flat")
    r = evaluate.analyze(img, scene)
    assert r["background"] == [True] and r["color"] == [False] and r["shape"] == [False]


class _StubVAE:
    """encode → decode as identity (or a flat grey image), to test the round-trip scoring itself."""

    dtype = torch.float32

    def __init__(self, flat: bool = False):
        self.flat = flat

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=torch.zeros_like(z) if self.flat else z)


def test_reconstruction_score_reads_the_round_trip():
    scenes = evaluate.eval_scenes(10, 1)
    pipe = SimpleNamespace(device=torch.device("cpu"), vae=_StubVAE())
    assert min(evaluate.score_reconstruction(pipe, scenes, batch=4).values()) >= 0.9
    pipe.vae = _StubVAE(flat=True)
    assert evaluate.score_reconstruction(pipe, scenes)["shape"] == 0.0


def test_colour_amount_projects_pixels_from_the_background_onto_the_colour():
    import numpy as np

    from attnmod.toy import dataset
    from attnmod.toy.evaluate import colour_amount

    white = np.full((4, 4, 3), 245 / 255, dtype=np.float32)
    red = np.broadcast_to(np.array(dataset.COLORS["red"], dtype=np.float32) / 255, (4, 4, 3)).copy()
    assert colour_amount(white, "red") == 0.0 and abs(colour_amount(red, "red") - 1.0) < 1e-5
    half = white.copy()
    half[:2] = red[:2]
    assert abs(colour_amount(half, "red") - 0.5) < 1e-5
    cyan = np.broadcast_to(np.array(dataset.COLORS["cyan"], dtype=np.float32) / 255, (4, 4, 3))
    assert 0 < colour_amount(cyan, "red") < 0.2  # another colour counts only by its overlap with red's direction


def test_border_colours_reads_the_background_from_the_image_edge():
    labels = np.full((16, 16), 2)  # yellow everywhere
    labels[5:11, 5:11] = 0  # a red object inside
    labels[0, :4] = -1  # outline pixels are left out
    index, hist = evaluate.border_colours(labels)
    assert index == 2 and hist[2] == 1.0 and hist.sum() == 1.0
    assert evaluate.border_colours(np.full((8, 8), -1))[0] == -1
