"""Measure how faithfully a toy model follows prompts, from the generated images alone.

For held-out scenes (seeds from ``train.EVAL_SEED0`` up, never trained on) the model draws the full
caption; ``analyze`` then reads each image without any model:

* pixels are labelled with the nearest palette colour (also its pattern shade, and black outlines);
* background colour = majority label of the 2-pixel border;
* objects = 4-connected components of non-background pixels (≥ ``MIN_AREA`` pixels);
* 1-object prompts: the largest component is the object; 2-object prompts: each prompted object is
  the largest component whose dominant colour is the prompted one (absent → every check fails);
* colour = the component's majority label (black excluded); position = the nearest of the five
  anchors to its centroid; shape = best IoU against the generator's own shape templates, both
  cropped to their bounding box and resized to 32×32; size = the nearer of the two template areas.

``evaluate`` returns an ``EvalResult`` (also the checks on VAE round trips of the true images, the
ceiling the decoder sets); the sweep reports the guidance scales that still
meet the targets (colour, background ≥ 90 %, position ≥ 85 %, shape ≥ 75 % on 1-object prompts).

Free layouts (``EvalConfig.layout_prompts``; ``dataset.sample_layout`` scenes, captions without place
words): ``analyze_layout`` looks each object up by its colour (as for 2 objects) and reports per object
colour (found), shape and size (area against the template at ``dataset.LARGE_FROM``), and per image
``all`` (every named object found) and ``count`` (exactly as many components as objects named).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from attnmod.toy import dataset
from attnmod.toy.model import SHIPPED

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0
MIN_AREA = 12
TARGETS = {"color": 0.90, "background": 0.90, "position": 0.85, "shape": 0.75}
CHECKS = ("color", "background", "position", "shape", "size")
EVAL_SEED0 = 10_000_000  # = train.EVAL_SEED0; training seeds are below it

_NAMES = list(dataset.COLORS)
_REF = np.array([*dataset.COLORS.values()] + [np.array(c) * dataset.PATTERN_SHADE for c in dataset.COLORS.values()]
                + [(20, 20, 20)], dtype=np.float32)  # (17, 3)
_REF_LABEL = np.array(list(range(8)) * 2 + [-1])  # palette index; -1 = black (outline)


@dataclass(frozen=True)
class EvalConfig:
    n_prompts: int = 100  # per object count (1 and 2)
    steps: int = DEFAULT_STEPS
    guidance: float | None = None  # None: DEFAULT_GUIDANCE
    sweep: tuple[float, ...] = ()  # guidance scales for the sweep (1-object prompts)
    sweep_prompts: int = 50
    seed: int = 0
    batch: int = 25
    layout_prompts: int = 0  # free-layout prompts per object count (1, 2, 3); 0: none

    def __post_init__(self):
        if self.n_prompts < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError("n_prompts, steps and batch must be >= 1")


@dataclass(frozen=True)
class EvalResult:
    model: str
    steps: int
    guidance: float
    n_prompts: int
    one_object: dict[str, float]  # check → accuracy
    two_objects: dict[str, float]
    sweep: dict[float, dict[str, float]] = field(default_factory=dict)  # guidance → 1-object accuracies
    faithful_guidance: tuple[float, ...] = ()  # sweep scales that meet TARGETS
    # the same checks on VAE round trips of the 1-object scenes' true images: what the decoder allows
    reconstruction: dict[str, float] = field(default_factory=dict)
    # free layouts: object count → LAYOUT_CHECKS accuracies (and "truth": the checks on the true images)
    layout: dict[str, dict[str, float]] = field(default_factory=dict)

    def meets_targets(self) -> bool:
        return all(self.one_object[k] >= v for k, v in TARGETS.items())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sweep"] = {str(k): v for k, v in self.sweep.items()}
        d["meets_targets"] = self.meets_targets()
        return d


# --- image analysis -------------------------------------------------------------------------------

def label_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W) palette index of the nearest reference colour per pixel (-1 = black)."""
    d = ((image[..., None, :].astype(np.float32) - _REF) ** 2).sum(-1)  # (H, W, 17)
    return _REF_LABEL[d.argmin(-1)]


def components(mask: np.ndarray, min_area: int = MIN_AREA) -> list[np.ndarray]:
    """4-connected components of a bool mask, largest first, each as a bool mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(pix) >= min_area:
            comp = np.zeros_like(mask, dtype=bool)
            ys, xs = zip(*pix, strict=True)
            comp[list(ys), list(xs)] = True
            out.append(comp)
    return sorted(out, key=lambda m: -int(m.sum()))


def _crop32(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    return np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((32, 32), Image.Resampling.BILINEAR)) >= 128


_TEMPLATES = {s: _crop32(dataset.shape_mask(s, 32, 32, 20)) for s in dataset.SHAPES}
_AREAS = {(s, z): int(dataset.shape_mask(s, 32, 32, r).sum()) for s in dataset.SHAPES for z, r in dataset.RADIUS.items()}


def classify_shape(mask: np.ndarray) -> str:
    c = _crop32(mask)
    iou = {s: (c & t).sum() / max((c | t).sum(), 1) for s, t in _TEMPLATES.items()}
    return max(iou, key=iou.get)


def nearest_anchor(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    return min(dataset.ANCHORS, key=lambda k: (dataset.ANCHORS[k][0] - cx) ** 2 + (dataset.ANCHORS[k][1] - cy) ** 2)


def colour_amount(image: np.ndarray, color: str, background: str = "white") -> float:
    """How much of ``color`` an (H, W, 3) [0, 1] image holds: each pixel projected from the background
    colour onto the palette colour (1 = the palette colour, clipped at 0), averaged over the image. It
    grows with the object's area and with its saturation."""
    bg = np.array(dataset.COLORS[background], dtype=np.float32) / 255
    direction = np.array(dataset.COLORS[color], dtype=np.float32) / 255 - bg  # (3,)
    return float(np.clip((image - bg) @ direction / (direction @ direction), 0, None).mean())


def border_colours(labels: np.ndarray, width: int = 3) -> tuple[int, np.ndarray]:
    """The background as the image's border shows it: (dominant palette index or -1, histogram of the border's
    palette indices, summing to 1). labels: (H, W) from ``label_pixels``."""
    border = np.concatenate([labels[:width].ravel(), labels[-width:].ravel(), labels[:, :width].ravel(),
                             labels[:, -width:].ravel()])
    border = border[border >= 0]
    hist = np.bincount(border, minlength=len(_NAMES))[: len(_NAMES)].astype(float)
    return (int(hist.argmax()) if hist.sum() else -1), hist / max(hist.sum(), 1)


def dominant_color(labels: np.ndarray, mask: np.ndarray) -> str | None:
    vals = labels[mask]
    vals = vals[vals >= 0]
    return _NAMES[np.bincount(vals, minlength=8).argmax()] if len(vals) else None


def analyze(image: np.ndarray, scene: dataset.Scene | dataset.Parsed) -> dict[str, list[bool]]:
    """Per-check, per-object pass/fail for one (64, 64, 3) uint8 image against its scene."""
    labels = label_pixels(image)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    border = border[border >= 0]
    bg = int(np.bincount(border, minlength=8).argmax()) if len(border) else -2
    bg_ok = bg >= 0 and _NAMES[bg] == scene.background
    comps = components(labels != bg)
    doms = [dominant_color(labels, c) for c in comps]
    res: dict[str, list[bool]] = {k: [] for k in CHECKS}
    for obj in scene.objects:
        if len(scene.objects) == 1:
            found = comps[0] if comps else None
            color_ok = bool(comps) and doms[0] == obj.color
        else:
            matches = [c for c, d in zip(comps, doms, strict=True) if d == obj.color]
            found = matches[0] if matches else None
            color_ok = found is not None
        res["color"].append(color_ok)
        res["background"].append(bg_ok)
        res["position"].append(found is not None and nearest_anchor(found) == obj.position)
        res["shape"].append(found is not None and classify_shape(found) == obj.shape)
        area = 0 if found is None else int(found.sum())
        size = min(dataset.SIZES, key=lambda z: abs(_AREAS[(obj.shape, z)] - area))
        res["size"].append(found is not None and size == obj.size)
    return res


def accuracy(results: list[dict[str, list[bool]]], checks: tuple[str, ...] = CHECKS) -> dict[str, float]:
    return {k: float(np.mean([v for r in results for v in r[k]])) for k in checks}


LAYOUT_CHECKS = ("color", "background", "shape", "size", "all", "count")
_LARGE_AREAS = {s: int(dataset.shape_mask(s, 32, 32, dataset.LARGE_FROM).sum()) for s in dataset.SHAPES}


def analyze_layout(image: np.ndarray, scene: dataset.Scene | dataset.Parsed) -> dict[str, list[bool]]:
    """Free-layout checks for one image: per object colour (an object of that colour found), shape, size;
    per image background, ``all`` (every object found) and ``count`` (as many components as objects)."""
    labels = label_pixels(image)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    border = border[border >= 0]
    bg = int(np.bincount(border, minlength=8).argmax()) if len(border) else -2
    comps = components(labels != bg)
    doms = [dominant_color(labels, c) for c in comps]
    res: dict[str, list[bool]] = {k: [] for k in LAYOUT_CHECKS}
    for obj in scene.objects:
        found = next((c for c, d in zip(comps, doms, strict=True) if d == obj.color), None)
        res["color"].append(found is not None)
        res["shape"].append(found is not None and classify_shape(found) == obj.shape)
        large = found is not None and int(found.sum()) >= _LARGE_AREAS[obj.shape]
        res["size"].append(found is not None and large == (obj.size == "large"))
    res["background"].append(bg >= 0 and _NAMES[bg] == scene.background)
    res["all"].append(all(res["color"]))
    res["count"].append(len(comps) == len(scene.objects))
    return res


def layout_scenes(n: int, n_objects: int, seed: int = 0) -> list[dataset.Scene]:
    """Held-out free layouts: ``dataset.sample_layout``'s scenes for seeds EVAL_SEED0 + seed*1e6 + n_objects*1e5 + i."""
    base = EVAL_SEED0 + seed * 1_000_000 + n_objects * 100_000
    return [dataset.random_layout_scene(dataset.layout_rng(base + i), n_objects) for i in range(n)]


def score_layout(pipe, scenes: list[dataset.Scene], steps: int, guidance: float, seed: int = 0, batch: int = 25,
                 progress: bool = False) -> dict[str, float]:
    images = generate(pipe, [dataset.caption(s) for s in scenes], steps, guidance, seed, batch, progress)
    return accuracy([analyze_layout(im, s) for im, s in zip(images, scenes, strict=True)], LAYOUT_CHECKS)


# --- generation -----------------------------------------------------------------------------------

def eval_scenes(n: int, n_objects: int, seed: int = 0) -> list[dataset.Scene]:
    """Held-out scenes: the generator's scenes for seeds EVAL_SEED0 + seed*1e6 + n_objects*1e5 + i."""
    base = EVAL_SEED0 + seed * 1_000_000 + n_objects * 100_000
    return [dataset.random_scene(np.random.default_rng(base + i), n_objects) for i in range(n)]


def load(model: str | Path = SHIPPED):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0, batch: int = 25,
             progress: bool = False) -> np.ndarray:
    """(N, 64, 64, 3) uint8 images; image i uses ``torch.Generator().manual_seed(seed + i)``."""
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc=f"generate g={guidance}", disable=not progress):
        chunk = prompts[start: start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np").images
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def score(pipe, scenes: list[dataset.Scene], steps: int, guidance: float, seed: int = 0, batch: int = 25,
          progress: bool = False) -> dict[str, float]:
    images = generate(pipe, [dataset.caption(s) for s in scenes], steps, guidance, seed, batch, progress)
    return accuracy([analyze(im, s) for im, s in zip(images, scenes, strict=True)])


@torch.no_grad()
def score_reconstruction(pipe, scenes: list[dataset.Scene], batch: int = 25) -> dict[str, float]:
    """The checks on encode → decode round trips of the scenes' rendered images (latent means)."""
    results = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start: start + batch]
        x = torch.from_numpy(np.stack([dataset.render(s)[0] for s in chunk]))  # (b, 64, 64, 3) uint8
        x = x.permute(0, 3, 1, 2).float().to(pipe.device, pipe.vae.dtype) / 127.5 - 1
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        rec = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        results += [analyze(im, s) for im, s in zip(rec, chunk, strict=True)]
    return accuracy(results)


def faithful(acc: dict[str, float]) -> bool:
    return all(acc[k] >= v for k, v in TARGETS.items())


def evaluate(model: str | Path = SHIPPED, cfg: EvalConfig = EvalConfig(), progress: bool = True,
             pipe=None) -> EvalResult:
    """Score 1- and 2-object held-out prompts (and the optional guidance sweep)."""
    pipe = pipe or load(model)
    guidance = DEFAULT_GUIDANCE if cfg.guidance is None else cfg.guidance
    one = score(pipe, eval_scenes(cfg.n_prompts, 1, cfg.seed), cfg.steps, guidance, cfg.seed, cfg.batch, progress)
    two = score(pipe, eval_scenes(cfg.n_prompts, 2, cfg.seed), cfg.steps, guidance, cfg.seed, cfg.batch, progress)
    sweep = {}
    for g in cfg.sweep:
        scenes = eval_scenes(cfg.sweep_prompts, 1, cfg.seed)
        sweep[g] = one if (g == guidance and cfg.sweep_prompts == cfg.n_prompts) else score(
            pipe, scenes, cfg.steps, g, cfg.seed, cfg.batch, progress)
    rec = score_reconstruction(pipe, eval_scenes(cfg.n_prompts, 1, cfg.seed), cfg.batch)
    layout = {}
    for n in (1, 2, 3) if cfg.layout_prompts else ():
        scenes = layout_scenes(cfg.layout_prompts, n, cfg.seed)
        layout[str(n)] = score_layout(pipe, scenes, cfg.steps, guidance, cfg.seed, cfg.batch, progress)
        layout[f"{n} truth"] = accuracy([analyze_layout(dataset.render(s)[0], s) for s in scenes], LAYOUT_CHECKS)
    return EvalResult(str(model), cfg.steps, guidance, cfg.n_prompts, one, two, sweep,
                      tuple(g for g, a in sweep.items() if faithful(a)), rec, layout)


if __name__ == "__main__":
    import sys

    from attnmod.toy.cli import main

    sys.exit(main(["eval-toy", *sys.argv[1:]]))
