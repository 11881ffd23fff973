"""Attention maps, self-segmentation and Prompt-to-Prompt measured on the embedded toy model.

    python benchmarks/maps_eval.py [--seeds 2] [--steps N] [--guidance G] [--maps-only | --edits-only]
                                   [--json FILE]
                                   [--reweight-figure PNG]

Ground truth comes from the generated images themselves: the object is the set of pixels whose
nearest palette colour is the prompted object colour (the toy model's palette is the dataset's).
1. localisation: prompts put a shape left/right/top/bottom; is the shape (and colour) word's
   cross-attention centroid on that side? Over every block and over the 16x16-latent blocks only.
   And what share of the object's patches' attention do the shape and colour words receive?
2. self-segmentation (k=3): IoU of the best-matching segment with the object mask (and with the
   generator's mask of the prompted scene: dataset.shape_mask at the position's anchor); is that
   segment labelled with the shape word (its top word)? with an object word (shape or colour)? with
   a word only the object's phrase has ("a large red star on the left": large, red, star, the, left)?
   with the shape word when only the prompt's nouns are candidate labels (words=[shape, background, style])?
   is it the shape word's highest-scoring segment?
3. word swap circle -> square: mean pixel change outside the object (source vs edit, and source vs a
   plain generation of the edited prompt), and the shape of the edited object; plain, with the reference's
   local blend (cross layers at 1/4 of the latent), and with the blend at the latent's resolution.
4. re-weighting the colour word (x0, 0.5, 1, 2, 4; 4 colours x seeds, each with another shape), the
   reference's rule (inside the 0.8 cross-replace window) and the every-step departure: the amount of that colour in the image (each
   pixel projected from the white background onto the colour, 1 = the palette colour, averaged over
   the image; it grows with the object's area and with its saturation) and the share of pixels in it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from attnmod import Recipe, load_pipeline  # noqa: E402
from attnmod.defaults import model_defaults  # noqa: E402
from attnmod.generate import generate  # noqa: E402
from attnmod.maps import trace  # noqa: E402
from attnmod.methods.p2p import EditOptions, edit  # noqa: E402
from attnmod.segment import self_segmentation  # noqa: E402
from attnmod.toy import dataset  # noqa: E402
from attnmod.toy.evaluate import _NAMES, classify_shape, colour_amount, components, label_pixels  # noqa: E402

SIDES = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}  # (axis: 0 x 1 y, sign)


def prompt(shape, color, position, bg="white"):
    return f"a large {color} {shape} {dataset.PLACES[position]}, on a plain {bg} background, flat style"


def object_mask(image: np.ndarray, color: str) -> np.ndarray:
    labels = label_pixels((image * 255).round().astype(np.uint8))
    mask = labels == _NAMES.index(color)
    parts = components(mask)
    return parts[0] if parts else mask


# every block (DAAM's aggregate) and the 16x16-latent blocks only (Prompt-to-Prompt's res-16 aggregate)
SELECTORS = ("all", "D0*+U3*")


def on_side(m: torch.Tensor, position: str) -> int:
    """1 if the (H, W) map's centroid lies on the prompted side of the image centre."""
    ys, xs = torch.meshgrid(torch.arange(m.shape[0]), torch.arange(m.shape[1]), indexing="ij")
    centroid = ((m * xs).sum() / m.sum(), (m * ys).sum() / m.sum())
    axis, sign = SIDES[position]
    return int(sign * (float(centroid[axis]) - (m.shape[1 - axis] - 1) / 2) > 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--maps-only", action="store_true", help="only parts 1-2 (no Prompt-to-Prompt edits)")
    ap.add_argument("--edits-only", action="store_true", help="only parts 3-4 (the Prompt-to-Prompt edits)")
    ap.add_argument("--json")
    ap.add_argument("--reweight-figure", help="write part 4's edits as a grid (rows: prompts, columns: factors)")
    ap.add_argument("--model", default="toy", help="the embedded model, or a folder exported by train-toy")
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.model, device="cpu")
    d = model_defaults(pipe)
    steps, guidance = args.steps or d["steps"], args.guidance or d["guidance"]
    colors = [c for c in dataset.COLORS if c != "white"]
    results = {"steps": steps, "guidance": guidance}

    for selector in () if args.edits_only else SELECTORS:
        hits, color_hits, ious, labelled, object_word, own_phrase, shape_best, n = 0, 0, [], 0, 0, 0, 0, 0
        noun_labelled, taken, scene_ious, drawn_vs_generated = 0, [], [], []  # per image: share of the object patches' attention that goes to (shape word, colour word)
        for seed in range(args.seeds):
            for i, shape in enumerate(dataset.SHAPES):
                for j, position in enumerate(SIDES):
                    color = colors[(i * 4 + j + seed) % len(colors)]
                    text = prompt(shape, color, position)
                    recipe = Recipe(text, seed=seed, steps=steps, guidance=guidance, width=64, height=64, model="toy")
                    with trace(pipe, blocks=selector) as tc:
                        image = generate(pipe, recipe)
                    maps = tc.result(text)
                    hits += on_side(maps.word_map(shape), position)
                    color_hits += on_side(maps.word_map(color), position)
                    mask = object_mask(image, color)
                    patches = F.interpolate(torch.from_numpy(mask).float()[None, None], size=maps.cross.shape[1:3],
                                            mode="area")[0, 0]  # (H, W) share of each latent patch in the object
                    received = (maps.cross[0] * patches[..., None]).sum((0, 1))  # (tokens,)
                    taken.append([float(received[maps.token_index(w)].sum() / received.sum()) for w in (shape, color)])
                    seg = self_segmentation(maps, k=3)
                    nouns = self_segmentation(maps, k=3, words=[shape, "background", "style"])
                    up = F.interpolate(seg.labels[None, None].float(), size=mask.shape, mode="nearest")[0, 0]
                    up = up.long().numpy()
                    seg_iou = [((up == s) & mask).sum() / max(((up == s) | mask).sum(), 1) for s in range(3)]
                    best = int(np.argmax(seg_iou))
                    ious.append(float(seg_iou[best]))
                    cx, cy = dataset.ANCHORS[position]
                    drawn = dataset.shape_mask(shape, cx, cy, dataset.RADIUS["large"])  # the generator's own mask
                    scene_ious.append(max(((up == s) & drawn).sum() / ((up == s) | drawn).sum() for s in range(3)))
                    drawn_vs_generated.append((drawn & mask).sum() / (drawn | mask).sum())
                    shape_scores = [dict(seg.legend[s]).get(shape, 0.0) for s in range(3)]
                    shape_best += int(int(np.argmax(shape_scores)) == best)
                    labelled += int(seg.label(best) == shape)
                    noun_labelled += int(nouns.label(best) == shape)
                    object_word += int(seg.label(best) in (shape, color))
                    head, tail = text.split(",", 1)
                    own_phrase += int(seg.label(best) in set(head.split()) - set(tail.split()))
                    n += 1
        results[selector] = {"localisation": hits / n, "colour_localisation": color_hits / n,
                             "segmentation_iou": float(np.mean(ious)),
                             "segmentation_iou_with_generator_mask": float(np.mean(scene_ious)),
                             "generated_object_iou_with_generator_mask": float(np.mean(drawn_vs_generated)),
                             "object_segment_labelled_with_shape": labelled / n,
                             "object_segment_labelled_with_an_object_word": object_word / n,
                             "object_segment_labelled_with_shape_among_nouns": noun_labelled / n,
                             "object_segment_labelled_from_its_phrase": own_phrase / n,
                             "shape_word_scores_highest_on_object_segment": shape_best / n,
                             "object_attention_to_shape_word": float(np.mean(taken, 0)[0]),
                             "object_attention_to_colour_word": float(np.mean(taken, 0)[1]), "images": n}
        print(f"blocks {selector!r}:")
        print(f"1. word-map centroid on the prompted side: shape word {hits}/{n} = {hits / n:.0%}, "
              f"colour word {color_hits}/{n} = {color_hits / n:.0%}; the object's patches take "
              f"{np.mean(taken, 0)[0]:.1%} of their attention from the shape word, {np.mean(taken, 0)[1]:.1%} from the colour word")
        print(f"2. self-segmentation: mean IoU {np.mean(ious):.2f} (with the generator's mask of the prompted scene: "
              f"{np.mean(scene_ious):.2f}; the generated object's own IoU with it: {np.mean(drawn_vs_generated):.2f}); object segment labelled with the shape word "
              f"{labelled}/{n}, with the shape or colour word {object_word}/{n}, with a word of the object's phrase "
              f"{own_phrase}/{n}; labelled with the shape word among the nouns (shape, background, style) {noun_labelled}/{n}; "
              f"the shape word scores highest "
              f"on the object segment {shape_best}/{n}")

    if args.maps_only:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
        return 0
    # the reference's defaults; its local blend (cross layers at 1/4 of the latent: 4x4 here); the blend at the
    # latent's resolution (16x16, where this model's maps localise)
    swaps = {"plain swap": EditOptions(),
             "blend (reference: 1/4 latent)": EditOptions(local_blend=("circle", "square")),
             "blend, blend_downsample=1": EditOptions(local_blend=("circle", "square"), blend_downsample=1)}
    results["swap"] = {}
    for name, options in swaps.items():
        outside, plain_outside, swapped, shares = [], [], 0, []
        for seed in range(args.seeds):
            for color in colors[:4]:
                src = prompt("circle", color, "left", "yellow" if color != "yellow" else "blue")
                dst = src.replace("circle", "square")
                r = edit(pipe, src, dst, seed=seed, steps=steps, guidance=guidance, width=64, height=64,
                         options=options)
                plain = generate(pipe, Recipe(dst, seed=seed, steps=steps, guidance=guidance, width=64, height=64))
                region = object_mask(r.source, color) | object_mask(r.edited, color) | object_mask(plain, color)
                outside.append(float(np.abs(r.edited - r.source)[~region].mean()))
                shares.extend(r.blend_share)
                plain_outside.append(float(np.abs(plain - r.source)[~region].mean()))
                edited_object = object_mask(r.edited, color)
                swapped += int(edited_object.any() and classify_shape(edited_object) == "square")
        k = len(outside)
        results["swap"][name] = {"outside_change": float(np.mean(outside)), "shape_changed": swapped / k,
                                 "plain_outside_change": float(np.mean(plain_outside)),
                                 "blend_share": [float(np.min(shares)), float(np.mean(shares)),
                                                 float(np.max(shares))] if shares else None}
        blend = (f"; the blend let {np.min(shares):.2f}-{np.max(shares):.2f} (mean {np.mean(shares):.2f}) of the "
                 f"latent change per step" if shares else "")
        print(f"3. word swap circle->square, {name}: mean |pixel change| outside the object {np.mean(outside):.4f} "
              f"(plain generation of the edited prompt: {np.mean(plain_outside):.4f}); edited shape is a square "
              f"{swapped}/{k}{blend}")

    factors = (0.0, 0.5, 1.0, 2.0, 4.0)
    # the reference: re-weighting inside the cross-replace window (defaults 0.8 / 0.4, source = edited prompt);
    # attnmod's departure: the edit's own maps re-weighted at every step, nothing replaced
    variants = {"reference": lambda color, f: EditOptions(reweight={color: f}),
                "every step": lambda color, f: EditOptions(0.0, 0.0, reweight={color: f}, reweight_every_step=True)}
    results["reweight"] = {}
    for name, make in variants.items():
        strength, share = {f: [] for f in factors}, {f: [] for f in factors}
        rows = []
        for seed in range(args.seeds):
            for k, color in enumerate(colors[:4]):
                text = prompt(dataset.SHAPES[(k + seed) % len(dataset.SHAPES)], color, "center")
                row = []
                for f in factors:
                    r = edit(pipe, text, text, seed=seed, steps=steps, guidance=guidance, width=64, height=64,
                             options=make(color, f))
                    row.append(r.edited)
                    labels = label_pixels((r.edited * 255).round().astype(np.uint8))
                    share[f].append(float((labels == _NAMES.index(color)).mean()))
                    strength[f].append(colour_amount(r.edited, color))
                rows.append(np.concatenate(row, 1))
        amounts = np.array([strength[f] for f in factors])  # (factors, images)
        monotonic = int((np.diff(amounts, axis=0) > 0).all(0).sum())
        results["reweight"][name] = {"colour_amount": {f: float(np.mean(v)) for f, v in strength.items()},
                                     "colour_share": {f: float(np.mean(v)) for f, v in share.items()},
                                     "monotonic_images": monotonic / amounts.shape[1]}
        print(f"4. colour-word re-weighting ({name}), amount of the colour: "
              + ", ".join(f"x{f:g}: {np.mean(v):.4f}" for f, v in strength.items())
              + f"; rising at every step in {monotonic}/{amounts.shape[1]} images; share of pixels in the colour: "
              + ", ".join(f"x{f:g}: {np.mean(v):.4f}" for f, v in share.items()))
        if args.reweight_figure and name == "reference":
            grid = (np.concatenate(rows, 0) * 255).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
                args.reweight_figure)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
