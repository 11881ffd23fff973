from dataclasses import replace

import numpy as np
import torch

from attnmod.toy import dataset
from attnmod.toy.model import TINY
from attnmod.toy.probe import HEADS, IGNORE, CaptionProbe, mask_dropped, scene_labels
from attnmod.toy.train import TrainConfig, train


def test_scene_labels_name_the_scene_attributes():
    scene = dataset.Scene((dataset.Obj("star", "blue", "small", "left"),), "red", "dotted", "shaded")
    labels = dict(zip(HEADS, scene_labels(scene), strict=True))
    assert HEADS["shape0"][labels["shape0"]] == "star"
    assert HEADS["color0"][labels["color0"]] == "blue"
    assert HEADS["position0"][labels["position0"]] == "left"
    assert HEADS["background"][labels["background"]] == "red"
    assert HEADS["style"][labels["style"]] == "shaded"
    assert labels["shape1"] == labels["position1"] == IGNORE  # no second object


def test_dropped_clauses_are_not_asked_for():
    rng = np.random.default_rng(0)
    labels = torch.tensor([scene_labels(dataset.random_scene(rng, 2)) for _ in range(3)])
    out = mask_dropped(labels, keep_bg=torch.tensor([False, True, True]),
                       keep_style=torch.tensor([True, False, True]), keep_caption=torch.tensor([True, True, False]))
    names = list(HEADS)
    assert out[0, names.index("background")] == out[0, names.index("pattern")] == IGNORE
    assert out[0, names.index("style")] != IGNORE and out[0, names.index("shape1")] != IGNORE
    assert out[1, names.index("style")] == IGNORE and out[1, names.index("background")] != IGNORE
    assert (out[2] == IGNORE).all()  # the empty caption says nothing
    assert (labels[:, 0] != IGNORE).all()  # input untouched


def test_probe_loss_falls_when_features_separate_the_classes():
    torch.manual_seed(0)
    probe = CaptionProbe(tokens=4, dim=8)
    labels = torch.tensor([scene_labels(dataset.random_scene(np.random.default_rng(s))) for s in range(16)])
    emb = torch.randn(16, 4, 8, requires_grad=True)
    opt = torch.optim.Adam([emb], lr=0.05)
    first = probe.loss(emb, labels).item()
    for _ in range(100):  # only the features move: the cosine heads cannot be satisfied by scaling
        opt.zero_grad()
        probe.loss(emb, labels).backward()
        opt.step()
    assert probe.loss(emb, labels).item() < 0.5 * first


def test_training_with_the_probe_resumes_bit_exactly(tmp_path):
    cfg = TrainConfig(model=TINY, vae_steps=1, vae_batch=2, cache_size=4, steps=3, batch=2, ckpt_every=1,
                      export_every=100, keep_every=0, aux_from=1, decoder_steps=0)
    logs = []
    train(cfg, tmp_path / "a", export_to=None, progress=False, callback=logs.append)
    unet = [i for i in logs if i["phase"] == "unet"]
    assert "probe_loss" not in unet[0] and all("probe_loss" in i for i in unet[1:])
    train(replace(cfg, steps=1), tmp_path / "b", export_to=None, progress=False)  # before the probe starts
    train(cfg, tmp_path / "b", export_to=None, progress=False)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])
    assert all(torch.equal(a["text_encoder"][k], b["text_encoder"][k]) for k in a["text_encoder"])
    assert torch.equal(a["probe"]["weight"], b["probe"]["weight"])


def test_resumes_a_checkpoint_saved_before_the_probe_existed(tmp_path):
    cfg = TrainConfig(model=TINY, vae_steps=1, vae_batch=2, cache_size=4, steps=1, batch=2, keep_every=0,
                      export_every=100, aux_from=1, decoder_steps=0)
    train(cfg, tmp_path / "w", export_to=None, progress=False)
    path = tmp_path / "w" / "ckpt.pt"
    old = torch.load(path, weights_only=False)
    old["opt"]["param_groups"] = old["opt"]["param_groups"][:1]  # as written by the earlier trainer
    old.pop("probe")
    old["sched"]["base_lrs"] = old["sched"]["base_lrs"][:1]
    old["sched"]["_last_lr"] = old["sched"]["_last_lr"][:1]
    torch.save(old, path)
    train(replace(cfg, steps=3), tmp_path / "w", export_to=None, progress=False)
    new = torch.load(path, weights_only=False)
    assert new["step"] == 3 and len(new["opt"]["param_groups"]) == 2
