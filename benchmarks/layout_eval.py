"""Layout control on the embedded model: is each subject inside its box, with its own colour and shape?

Held-out free-layout scenes of the toy dataset (``toy.evaluate.layout_scenes``: 2 and 3 objects anywhere, ~30 % of
them one shape in several colours), prompted with their captions, which name no place. Each object's box is the
box the dataset drew it in. Every method starts from the same noise per (scene, seed):

    none                the plain pipeline
    guidance            layout guidance (Chen et al.): the cross-attention loss on the latents, no masks
    bounded             Bounded Attention
    guidance-reference  and bounded-reference: the same with the reference's layers instead of the model's own
                        (``defaults.model_defaults(pipe)["layout"]``: the embedded model reads its 8x8 blocks)

plus named variants (``--variants``) of BoundedOptions fields. The image is read without any model
(``toy.evaluate``): each subject is the largest component whose dominant colour is its colour (none: neglected);
its shape is classified from the component; it is *in its box* when the component's centroid lies in the box, and
its IoU is the component's pixels against the box's.

    python benchmarks/layout_eval.py --model .train-layout/export --n2 24 --n3 12 --json out/layout.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnmod.methods.bounded import LAYOUT_GUIDANCE, BoundedOptions, Subject, bounded, overlay  # noqa: E402
from attnmod.options import with_settings  # noqa: E402
from attnmod.toy import dataset, evaluate  # noqa: E402


def subjects_of(scene: dataset.Scene) -> list[Subject]:
    boxes = dataset.object_boxes(scene)
    return [Subject(f"{o.size} {o.color} {o.shape}", tuple(float(v) for v in np.clip(b, 0, 1)))
            for o, b in zip(scene.objects, boxes, strict=True)]


def read_subjects(image: np.ndarray, scene: dataset.Scene) -> list[dict]:
    """Per object: found (its colour is there), shape right, centroid in its box, IoU with its box.
    image: (H, W, 3) floats in [0, 1]."""
    labels = evaluate.label_pixels((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    border = border[border >= 0]
    bg = int(np.bincount(border, minlength=8).argmax()) if len(border) else -2
    comps = evaluate.components(labels != bg)
    doms = [evaluate.dominant_color(labels, c) for c in comps]
    out = []
    H, W = labels.shape
    for obj, box in zip(scene.objects, dataset.object_boxes(scene), strict=True):
        mine = [c for c, d in zip(comps, doms, strict=True) if d == obj.color]
        if not mine:
            out.append({"found": False, "shape": False, "in_box": False, "iou": 0.0})
            continue
        c = max(mine, key=lambda m: int(m.sum()))
        ys, xs = np.nonzero(c)
        cx, cy = (xs.mean() + 0.5) / W, (ys.mean() + 0.5) / H
        x0, y0, x1, y1 = box
        rect = np.zeros_like(c)
        rect[int(round(y0 * H)) : int(round(y1 * H)), int(round(x0 * W)) : int(round(x1 * W))] = True
        iou = float((c & rect).sum() / max(1, (c | rect).sum()))
        out.append({"found": True, "shape": evaluate.classify_shape(c) == obj.shape,
                    "in_box": bool(x0 <= cx <= x1 and y0 <= cy <= y1), "iou": iou})
    return out


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    return {"subjects": n, "in_box": sum(r["in_box"] for r in rows) / n, "iou": float(np.mean([r["iou"] for r in rows])),
            "iou_0.5": sum(r["iou"] >= 0.5 for r in rows) / n,
            "colour_shape": sum(r["found"] and r["shape"] for r in rows) / n,
            "neglected": sum(not r["found"] for r in rows) / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    ap.add_argument("--n2", type=int, default=24, help="two-object scenes")
    ap.add_argument("--n3", type=int, default=12, help="three-object scenes")
    ap.add_argument("--toy", action="store_true", help="the model is an export of the embedded model's training: "
                    "use the embedded model's layout settings")
    ap.add_argument("--seeds", type=int, default=1, help="noise seeds per scene")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=evaluate.DEFAULT_GUIDANCE)
    ap.add_argument("--methods", default="none,guidance,bounded",
                    help="comma-separated: none, guidance, bounded, guidance-reference, bounded-reference")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=V[,FIELD=V]",
                    help="an extra bounded run with these BoundedOptions settings (repeatable)")
    ap.add_argument("--figure", help="write a PNG: per scene (rows) each method's overlay (columns)")
    ap.add_argument("--figure-rows", type=int, default=6)
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from attnmod.loading import load_pipeline
    from attnmod.toy.model import SHIPPED

    pipe = load_pipeline(str(args.model or SHIPPED))
    pipe.set_progress_bar_config(disable=True)
    scenes = evaluate.layout_scenes(args.n2, 2) + evaluate.layout_scenes(args.n3, 3)
    same = sum(len({o.shape for o in s.objects}) == 1 for s in scenes)
    from attnmod.defaults import TOY_LAYOUT, model_defaults

    # the model's own blocks (the embedded model's 8x8 ones; --toy: a training export of it)
    own = TOY_LAYOUT if args.toy else model_defaults(pipe).get("layout", {})
    known = {"none": BoundedOptions(), "guidance": replace(LAYOUT_GUIDANCE, **own), "bounded": replace(
        BoundedOptions(), **own), "guidance-reference": LAYOUT_GUIDANCE, "bounded-reference": BoundedOptions()}
    unknown = [m for m in args.methods.split(",") if m not in known]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(known)}")
    methods = {m: known[m] for m in args.methods.split(",")}
    for v in args.variant:
        name, _, settings = v.partition(":")
        methods[name] = with_settings(BoundedOptions(), settings.split(","))
    results, figure = {}, []
    for name, options in methods.items():
        rows, seconds, runs, skipped = [], 0.0, 0, []
        for i, scene in enumerate(scenes):
            subjects = subjects_of(scene)
            for seed in range(args.seeds):
                t = time.perf_counter()
                try:
                    r = bounded(pipe, dataset.caption(scene), [] if name == "none" else subjects, options, steps=args.steps,
                                guidance=args.guidance, seed=seed)
                except ValueError as e:  # e.g. a box smaller than a cell of the layers the settings read
                    skipped.append(f"scene {i}: {e}")
                    break
                seconds += time.perf_counter() - t
                runs += 1
                rows += read_subjects(r.images[0], scene)
                if args.figure and seed == 0 and i < args.figure_rows:
                    figure.append((i, name, overlay(r.images[0], subjects, r.masks[0] if r.masks.numel() else None,
                                                    size=128)))
        if not rows:
            results[name] = {"subjects": 0, "skipped_scenes": len(skipped), "why": skipped[:3]}
            print(name, json.dumps(results[name]), flush=True)
            continue
        results[name] = {**summarise(rows), "seconds_per_image": seconds / max(1, runs),
                         "skipped_scenes": len(skipped), "why": skipped[:3]}
        print(name, json.dumps(results[name]), flush=True)
    report = {"model": str(args.model or "embedded"), "scenes": len(scenes), "same_shape_scenes": same,
              "seeds": args.seeds, "steps": args.steps, "guidance": args.guidance, "threads": args.threads,
              "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("| method | subjects in box (centroid) | mean IoU | IoU >= 0.5 | right colour and shape | neglected | s/image |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if not r["subjects"]:
            print(f"| {name} | every scene skipped: {r['why'][0] if r['why'] else ''} |")
            continue
        print(f"| {name} | {r['in_box']:.0%} | {r['iou']:.2f} | {r['iou_0.5']:.0%} | {r['colour_shape']:.0%} | "
              f"{r['neglected']:.0%} | {r['seconds_per_image']:.1f} |"
              + (f" ({r['skipped_scenes']} scenes skipped)" if r["skipped_scenes"] else ""))
    if args.figure:
        from PIL import Image

        names = list(methods)
        rows_n = min(args.figure_rows, len(scenes))
        sheet = Image.new("RGB", (len(names) * 132, rows_n * 132), "white")
        for i, name, im in figure:
            sheet.paste(im, (names.index(name) * 132, i * 132))
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
