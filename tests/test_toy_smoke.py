"""The shipped toy model follows colour on a few prompts at few steps (fast smoke test)."""

import torch

from attnmod.toy import dataset, evaluate
from attnmod.toy.model import SHIPPED

PROMPTS = [
    dataset.Scene((dataset.Obj("circle", "red", "large", "center"),), "white", "plain", "flat"),
    dataset.Scene((dataset.Obj("square", "blue", "large", "left"),), "yellow", "plain", "flat"),
    dataset.Scene((dataset.Obj("star", "green", "large", "right"),), "white", "striped", "outlined"),
    dataset.Scene((dataset.Obj("triangle", "yellow", "large", "center"),), "purple", "plain", "shaded"),
]


def test_shipped_model_follows_colour():
    torch.manual_seed(0)
    pipe = evaluate.load(SHIPPED)
    prompts = [dataset.caption(s) for s in PROMPTS]
    images = evaluate.generate(pipe, prompts, steps=8, guidance=evaluate.DEFAULT_GUIDANCE, seed=0, batch=len(prompts))
    res = [evaluate.analyze(im, s) for im, s in zip(images, PROMPTS, strict=True)]
    color = sum(r["color"][0] for r in res)
    background = sum(r["background"][0] for r in res)
    assert color >= 3 and background >= 3, res
