"""StyleAligned measured on the embedded toy model: style consistency vs prompt fidelity.

    python benchmarks/style_eval.py [--sets 12] [--set-seed 0] [--variants NAME ...] [--json FILE]

Each set: a reference prompt with a background and draw style ("..., on a striped yellow background,
outlined style") and three target prompts naming only their object ("a small blue star on the left").
Without sharing, the targets' backgrounds are whatever the model picks; with StyleAligned they should
follow the reference. Measured from the images alone (the dataset's palette):
* consistency — the target's background colour (dominant border colour) equals the reference's, and the
  histogram intersection of their background-colour distributions;
* fidelity — the target's object (largest non-background component) has its prompt's colour and shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnmod import load_pipeline  # noqa: E402
from attnmod.defaults import model_defaults  # noqa: E402
from attnmod.methods.style_aligned import StyleAlignedOptions, style_aligned  # noqa: E402
from attnmod.toy import dataset  # noqa: E402
from attnmod.toy.evaluate import (  # noqa: E402
    border_colours,
    classify_shape,
    components,
    dominant_color,
    label_pixels,
)


def make_sets(n: int, seed: int = 0):
    rng = random.Random(seed)
    colors = list(dataset.COLORS)
    sets = []
    for _ in range(n):
        bg, pattern, style = rng.choice(colors), rng.choice(dataset.PATTERNS), rng.choice(dataset.STYLES)
        objs = []
        for position in ("left", "right", "top", "bottom"):
            color = rng.choice([c for c in colors if c != bg])
            objs.append((rng.choice(dataset.SIZES), color, rng.choice(dataset.SHAPES), position))
        ref = f"a {objs[0][0]} {objs[0][1]} {objs[0][2]} {dataset.PLACES[objs[0][3]]}, on a {pattern} {bg} background, {style} style"
        targets = [(f"a {s} {c} {sh} {dataset.PLACES[p]}", c, sh) for s, c, sh, p in objs[1:]]
        sets.append((ref, targets))
    return sets


def measure(pipe, sets, steps, guidance, options: StyleAlignedOptions | None):
    agree, overlap, color_ok, shape_ok = [], [], [], []
    for k, (ref, targets) in enumerate(sets):
        prompts = [ref] + [t[0] for t in targets]
        gens = [torch.Generator().manual_seed(1000 * k + i) for i in range(len(prompts))]
        with torch.inference_mode():
            if options is None:
                images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                              output_type="np").images
            else:
                with style_aligned(pipe, images=len(prompts), options=options):
                    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                                  output_type="np").images
        labels = [label_pixels((im * 255).round().astype(np.uint8)) for im in images]
        ref_bg, ref_hist = border_colours(labels[0])
        for (_, color, shape), lab in zip(targets, labels[1:], strict=True):
            bg, hist = border_colours(lab)
            agree.append(bg == ref_bg)
            overlap.append(float(np.minimum(hist, ref_hist).sum()))
            comps = components(lab != bg)
            color_ok.append(bool(comps) and dominant_color(lab, comps[0]) == color)
            shape_ok.append(bool(comps) and classify_shape(comps[0]) == shape)
    return {"background_agreement": float(np.mean(agree)), "background_overlap": float(np.mean(overlap)),
            "colour_fidelity": float(np.mean(color_ok)), "shape_fidelity": float(np.mean(shape_ok)),
            "targets": len(agree)}


VARIANTS = {
    "without sharing": None,
    "StyleAligned (defaults)": StyleAlignedOptions(),
    "+ adain_values": StyleAlignedOptions(adain_values=True),
    "+ shared_score_shift=log 2": StyleAlignedOptions(shared_score_shift=math.log(2)),
    "+ share_group_norm=False": StyleAlignedOptions(share_group_norm=False),
    "+ only_self_level=0.5": StyleAlignedOptions(only_self_level=0.5),
    "+ full_attention_share": StyleAlignedOptions(full_attention_share=True),
    "+ blocks='U*' (up blocks)": StyleAlignedOptions(blocks="U*"),
    "+ adain_values, blocks='U*'": StyleAlignedOptions(adain_values=True, blocks="U*"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=12)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--set-seed", type=int, default=0, help="draws other sets (a held-out check)")
    ap.add_argument("--variants", nargs="*", help="only these rows (prefixes of their names)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or any(k.startswith(p) for p in args.variants)}
    pipe = load_pipeline(args.model, device="cpu")
    d = model_defaults(pipe)
    steps, guidance = args.steps or d["steps"], args.guidance or d["guidance"]
    sets = make_sets(args.sets, args.set_seed)
    rows = {name: measure(pipe, sets, steps, guidance, options) for name, options in variants.items()}
    print(f"{args.sets} sets x 3 targets, {steps} steps, guidance {guidance:g}")
    print(f"{'':30}{'bg agreement':>14}{'bg overlap':>12}{'colour ok':>11}{'shape ok':>10}")
    for name, r in rows.items():
        print(f"{name:30}{r['background_agreement']:>14.0%}{r['background_overlap']:>12.2f}"
              f"{r['colour_fidelity']:>11.0%}{r['shape_fidelity']:>10.0%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"steps": steps, "guidance": guidance, **rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
