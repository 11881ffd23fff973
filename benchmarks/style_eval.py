"""StyleAligned measured on the embedded toy model: style consistency vs prompt fidelity.

    python benchmarks/style_eval.py [--sets 12] [--set-seed 0] [--variants NAME ...] [--json FILE]

Each set: a reference prompt with a background and draw style ("..., on a striped yellow background,
outlined style") and three target prompts naming only their object ("a small blue star on the left").
Without sharing, the targets' backgrounds are whatever the model picks; with StyleAligned they should
follow the reference. Measured from the images alone (the dataset's palette):
* consistency — the target's background colour (dominant border colour) equals the reference's, and the
  histogram intersection of their background-colour distributions;
* fidelity — the target's object (largest non-background component) has its prompt's colour and shape.

    python benchmarks/style_eval.py --controlnet [--sets 12]
    python benchmarks/style_eval.py --saved-reference [--sets 12] [--rounds 3] [--memory-side 256]
    python benchmarks/style_eval.py --chunk 256 [--sets 4] [--memory-side 256]

``--controlnet``: the same sets through the stock ControlNet pipeline with a ControlNet built from the model's own
UNet encoder (``zero_controlnet``: zero-initialised output convolutions, so neutral), each target's control image
its own image without sharing — every image compared bit for bit with StyleAligned without control; then the same
ControlNet with random output convolutions (active): the reference must stay bit-identical, the targets move.
``--saved-reference``: each set's reference computed once (``compute_reference``), saved and reloaded, and its
three targets made against it vs the four made together: the largest pixel difference, the style measures of
both, seconds per set and UNet rows (rounds interleaved, medians) and the peak working memory of one set in fresh
processes against the same number of images without sharing, for 1, 3 and 7 targets.
``--chunk N``: ``StyleAlignedOptions(query_chunk=N)`` against all queries at once: the largest pixel difference
over the sets (exactness), seconds per set, and the peak working memory of one set (fresh processes, 1, 3 and 7
targets, without sharing / shared / shared in chunks) with PyTorch's default SDPA kernel and with its math kernel
forced (``torch.nn.attention.sdpa_kernel``: the fallback where no fused kernel takes the mask).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attnmod import load_pipeline  # noqa: E402
from attnmod.defaults import model_defaults  # noqa: E402
from attnmod.methods.style_aligned import (  # noqa: E402
    StyleAlignedOptions,
    controlnet_pipeline,
    generate_style_set,
    style_aligned,
    zero_controlnet,
)
from attnmod.methods.style_reference import StyleReference, compute_reference  # noqa: E402
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
    scores = []
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
        scores.append(score_set(images, targets))
    return summarise(scores)


def score_set(images, targets) -> list[tuple[bool, float, bool, bool]]:
    """Per target: (background agrees with the reference's, overlap, colour ok, shape ok); images[0]: reference."""
    labels = [label_pixels((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in images]
    ref_bg, ref_hist = border_colours(labels[0])
    rows = []
    for (_, color, shape), lab in zip(targets, labels[1:], strict=True):
        bg, hist = border_colours(lab)
        comps = components(lab != bg)
        rows.append((bg == ref_bg, float(np.minimum(hist, ref_hist).sum()),
                     bool(comps) and dominant_color(lab, comps[0]) == color,
                     bool(comps) and classify_shape(comps[0]) == shape))
    return rows


def summarise(scores) -> dict:
    rows = [r for s in scores for r in s]
    agree, overlap, color_ok, shape_ok = (list(c) for c in zip(*rows, strict=True))
    return {"background_agreement": float(np.mean(agree)), "background_overlap": float(np.mean(overlap)),
            "colour_fidelity": float(np.mean(color_ok)), "shape_fidelity": float(np.mean(shape_ok)),
            "targets": len(agree)}


def _style_run(sets, k, steps, guidance):
    ref, targets = sets[k]
    return ref, [t[0] for t in targets], {"seed": 1000 * k, "steps": steps, "guidance": guidance}


def controlnet_neutrality(pipe, sets, steps, guidance) -> dict:
    """StyleAligned without control vs through StableDiffusionControlNetPipeline with the model's own UNet encoder
    as a zero-initialised ControlNet (neutral), then with random output convolutions (active)."""
    from PIL import Image

    neutral = controlnet_pipeline(pipe, zero_controlnet(pipe))
    active_net = zero_controlnet(pipe)
    torch.manual_seed(0)
    with torch.no_grad():
        for conv in [*active_net.controlnet_down_blocks, active_net.controlnet_mid_block,
                     active_net.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.05)
            conv.bias.zero_()
    active = controlnet_pipeline(pipe, active_net)
    rows = {"plain": [], "neutral": [], "active": []}
    worst = {"neutral": 0.0, "active reference": 0.0, "active targets min": float("inf")}
    identical = {"neutral": 0, "active reference": 0}
    seconds = {"plain": 0.0, "neutral": 0.0}
    for k in range(len(sets)):
        ref, targets, run = _style_run(sets, k, steps, guidance)
        with torch.inference_mode():  # each target's own image without sharing is its control image
            own = pipe(targets, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                       generator=[torch.Generator().manual_seed(1000 * k + i) for i in range(1, 4)]).images
        controls = [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in own]
        t = time.perf_counter()
        plain = generate_style_set(pipe, [ref, *targets], **run)
        seconds["plain"] += time.perf_counter() - t
        t = time.perf_counter()
        zero = generate_style_set(neutral, [ref, *targets], controls=controls, **run)
        seconds["neutral"] += time.perf_counter() - t
        moved = generate_style_set(active, [ref, *targets], controls=controls, **run)
        worst["neutral"] = max(worst["neutral"], float(np.abs(zero - plain).max()))
        identical["neutral"] += sum(np.array_equal(a, b) for a, b in zip(zero, plain, strict=True))
        worst["active reference"] = max(worst["active reference"], float(np.abs(moved[0] - plain[0]).max()))
        identical["active reference"] += int(np.array_equal(moved[0], plain[0]))
        worst["active targets min"] = min(worst["active targets min"],
                                          float(np.abs(moved[1:] - plain[1:]).max(axis=(1, 2, 3)).min()))
        for name, images in (("plain", plain), ("neutral", zero), ("active", moved)):
            rows[name].append(score_set(images, sets[k][1]))
    return {"images": 4 * len(sets), "identical": identical, "max_abs_difference": worst, "seconds": seconds,
            **{name: summarise(r) for name, r in rows.items()}}


def saved_reference_bench(pipe, sets, steps, guidance) -> dict:
    """Targets against a computed-once, saved and reloaded reference vs the set made together."""
    folder = Path(tempfile.mkdtemp(prefix="attnmod-ref-"))
    worst, joint_scores, saved_scores, compute_s, load_s = 0.0, [], [], [], []
    for k in range(len(sets)):
        ref, targets, run = _style_run(sets, k, steps, guidance)
        t = time.perf_counter()
        reference = compute_reference(pipe, ref, **run)
        compute_s.append(time.perf_counter() - t)
        path = reference.save(folder / f"{k}.safetensors")
        t = time.perf_counter()
        loaded = StyleReference.load(path)
        load_s.append(time.perf_counter() - t)
        joint = generate_style_set(pipe, [ref, *targets], **run)
        saved = generate_style_set(pipe, targets, saved_reference=loaded, **run)
        worst = max(worst, float(np.abs(saved - joint).max()))
        joint_scores.append(score_set(joint, sets[k][1]))
        saved_scores.append(score_set(saved, sets[k][1]))
    return {"max_abs_difference": worst, "joint": summarise(joint_scores), "saved": summarise(saved_scores),
            "compute_reference_seconds": statistics.median(compute_s), "load_seconds": statistics.median(load_s),
            "file_bytes": (folder / "0.safetensors").stat().st_size}


def timing(pipe, sets, steps, guidance, rounds: int, side: int) -> dict:
    """Seconds per set and UNet batch rows: the reference and 3 targets together vs 3 targets against the saved
    reference (loaded from its file), at ``side`` x ``side``, rounds interleaved, medians."""
    folder = Path(tempfile.mkdtemp(prefix="attnmod-ref-"))
    files = []
    for k in range(len(sets)):
        ref, _, run = _style_run(sets, k, steps, guidance)
        path = compute_reference(pipe, ref, width=side, height=side, **run).save(folder / f"{k}.safetensors")
        files.append(StyleReference.load(path))
    rows = {"joint": 0, "saved": 0}
    counting = {"on": None}

    def count(module, args, kwargs):
        if counting["on"]:
            rows[counting["on"]] += (args[0] if args else kwargs["sample"]).shape[0]

    handle = pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    times = {"joint": [], "saved": []}
    try:
        for r in range(rounds):
            for k in range(len(sets)):
                ref, targets, run = _style_run(sets, k, steps, guidance)
                for name in ("joint", "saved"):
                    counting["on"] = name if r == 0 and k == 0 else None
                    t = time.perf_counter()
                    if name == "joint":
                        generate_style_set(pipe, [ref, *targets], width=side, height=side, **run)
                    else:
                        generate_style_set(pipe, targets, saved_reference=files[k], width=side, height=side, **run)
                    times[name].append(time.perf_counter() - t)
    finally:
        handle.remove()
    return {"side": side, "sets": len(sets), "rounds": rounds, "unet_rows_per_set": rows,
            "seconds_per_set": {name: statistics.median(v) for name, v in times.items()}}


MEMORY_CHILD = r"""
import gc, os, sys, warnings
os.environ["HF_HUB_OFFLINE"] = "1"
warnings.filterwarnings("ignore")
import contextlib
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from attnmod import load_pipeline
from attnmod.methods.style_aligned import StyleAlignedOptions, generate_style_set
from attnmod.methods.style_reference import StyleReference
condition, side, steps, guidance, path, targets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
kernel, chunk = sys.argv[7], None if sys.argv[8] == "none" else int(sys.argv[8])
pipe = load_pipeline("toy", device="cpu")
prompts = ["a large red circle on the left, on a striped yellow background, outlined style"] + [
    "a small blue star on the right"] * targets
run = {"steps": steps, "guidance": guidance, "width": side, "height": side}
reference = StyleReference.load(path) if condition == "saved" else None

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident set size (VmHWM) to the current one
base = status("VmRSS")
with sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext():
    if condition == "saved":
        generate_style_set(pipe, prompts[1:], saved_reference=reference, **run)
    elif condition == "plain":
        with torch.inference_mode():
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, width=side, height=side,
                 output_type="np")
    else:
        generate_style_set(pipe, prompts, options=StyleAlignedOptions(query_chunk=chunk), **run)
print(base, status("VmHWM"))
"""


def peak_memory(condition: str, side: int, steps: int, guidance: float, path: str, targets: int,
                kernel: str = "default", chunk: int | None = None) -> int:
    """Peak resident memory above the loaded model (and the opened reference) of one set, in a fresh process."""
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, condition, str(side), str(steps), str(guidance), path,
                          str(targets), kernel, str(chunk).lower()], check=True, capture_output=True, text=True,
                         env=env)
    base, peak = out.stdout.strip().splitlines()[-1].split()
    return int(peak) - int(base)


def memory_bench(pipe, side: int, guidance: float, steps: int = 4) -> dict:
    """Working memory of N + 1 images without sharing, the reference + N targets made together, and N targets
    against a saved reference."""
    folder = Path(tempfile.mkdtemp(prefix="attnmod-ref-"))
    path = str(compute_reference(pipe, "a large red circle on the left, on a striped yellow background, outlined "
                                 "style", steps=steps, guidance=guidance, width=side, height=side).save(
        folder / "ref.safetensors"))
    out = {}
    for n in (1, 3, 7):
        out[n] = {c: peak_memory(c, side, steps, guidance, path, n) for c in ("plain", "joint", "saved")}
    return {"side": side, "steps": steps, "file_bytes": Path(path).stat().st_size, "targets": out}


def chunk_bench(pipe, sets, steps: int, guidance: float, chunk: int, memory_sides) -> dict:
    """``query_chunk=chunk`` vs all queries at once: exactness and time on the sets (64x64), peak memory."""
    largest, times = 0.0, {"whole": [], "chunked": []}
    for ref, targets in sets:
        prompts = [ref] + [t[0] for t in targets]
        images = {}
        for name, c in (("whole", None), ("chunked", chunk)):
            t0 = time.perf_counter()
            images[name] = generate_style_set(pipe, prompts, steps=steps, guidance=guidance,
                                              options=StyleAlignedOptions(query_chunk=c))
            times[name].append(time.perf_counter() - t0)
        largest = max(largest, float(np.abs(images["whole"] - images["chunked"]).max()))
    out = {"chunk": chunk, "max_abs_difference": largest,
           "seconds_per_set": {k: statistics.median(v) for k, v in times.items()}, "memory": {}}
    for side in memory_sides:
        out["memory"][side] = {k: {n: {c: peak_memory("plain" if c == "plain" else "joint", side, 2, guidance, "-",
                                                      n, k, chunk if c == "chunked" else None)
                                       for c in ("plain", "shared", "chunked")}
                                   for n in (1, 3, 7)}
                               for k in ("default", "math")}
    return out


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
    ap.add_argument("--controlnet", action="store_true", help="ControlNet neutrality (and activity) instead")
    ap.add_argument("--saved-reference", action="store_true", help="saved reference vs joint instead")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds of --saved-reference")
    ap.add_argument("--time-side", type=int, nargs="*", default=[64, 256],
                    help="image sides of --saved-reference's timing (the first 4 sets above 64)")
    ap.add_argument("--memory-side", type=int, nargs="*",
                    help="image sides of --saved-reference's (--chunk's: 256) memory measure (none: skip it)")
    ap.add_argument("--chunk", type=int, help="query_chunk=N vs all at once: exactness, time, memory instead")
    args = ap.parse_args(argv)
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or any(k.startswith(p) for p in args.variants)}
    pipe = load_pipeline(args.model, device="cpu")
    d = model_defaults(pipe)
    steps, guidance = args.steps or d["steps"], args.guidance or d["guidance"]
    sets = make_sets(args.sets, args.set_seed)
    if args.chunk:
        return chunk_main(args, pipe, sets, steps, guidance)
    if args.controlnet or args.saved_reference:
        return special(args, pipe, sets, steps, guidance)
    rows = {name: measure(pipe, sets, steps, guidance, options) for name, options in variants.items()}
    print(f"{args.sets} sets x 3 targets, {steps} steps, guidance {guidance:g}")
    print(f"{'':30}{'bg agreement':>14}{'bg overlap':>12}{'colour ok':>11}{'shape ok':>10}")
    for name, r in rows.items():
        print(f"{name:30}{r['background_agreement']:>14.0%}{r['background_overlap']:>12.2f}"
              f"{r['colour_fidelity']:>11.0%}{r['shape_fidelity']:>10.0%}")
    write_json(args.json, {"steps": steps, "guidance": guidance, **rows})
    return 0


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1, default=str))


def chunk_main(args, pipe, sets, steps, guidance) -> int:
    r = chunk_bench(pipe, sets, steps, guidance, args.chunk, [256] if args.memory_side is None else args.memory_side)
    print(f"query_chunk={args.chunk} vs all at once, {len(sets)} sets of 4 at 64x64, {steps} steps, "
          f"{torch.get_num_threads()} thread(s): largest pixel difference {r['max_abs_difference']:.2e}, seconds "
          f"per set {r['seconds_per_set']['whole']:.2f} vs {r['seconds_per_set']['chunked']:.2f}")
    for side, by_kernel in r["memory"].items():
        for kernel, rows in by_kernel.items():
            print(f"peak working memory, {side}x{side}, 2 steps, {kernel} SDPA kernel:")
            for n, v in rows.items():
                print(f"  {n} target(s): no sharing {v['plain'] / 2**20:8.1f} MiB, shared {v['shared'] / 2**20:8.1f} "
                      f"MiB, shared in chunks of {args.chunk} {v['chunked'] / 2**20:8.1f} MiB")
    write_json(args.json, r)
    return 0


def special(args, pipe, sets, steps, guidance) -> int:
    print(f"{len(sets)} sets x 3 targets, {steps} steps, guidance {guidance:g}, {torch.get_num_threads()} thread(s)")
    result = {"steps": steps, "guidance": guidance}
    header = f"{'':34}{'bg agreement':>14}{'bg overlap':>12}{'colour ok':>11}{'shape ok':>10}"

    def row(name, r):
        print(f"{name:34}{r['background_agreement']:>14.0%}{r['background_overlap']:>12.2f}"
              f"{r['colour_fidelity']:>11.0%}{r['shape_fidelity']:>10.0%}")

    if args.controlnet:
        r = result["controlnet"] = controlnet_neutrality(pipe, sets, steps, guidance)
        print(f"zero-initialised ControlNet: {r['identical']['neutral']}/{r['images']} images bit-identical to "
              f"StyleAligned without control (largest difference {r['max_abs_difference']['neutral']:g}); "
              f"{r['seconds']['neutral']:.1f} s vs {r['seconds']['plain']:.1f} s")
        print(f"active ControlNet: reference bit-identical in {r['identical']['active reference']}/{len(sets)} sets "
              f"(largest difference {r['max_abs_difference']['active reference']:g}); every target moved by at "
              f"least {r['max_abs_difference']['active targets min']:.3f}")
        print(header)
        for name, label in (("plain", "StyleAligned, no control"), ("neutral", "+ zero ControlNet"),
                            ("active", "+ active (random) ControlNet")):
            row(label, r[name])
    if args.saved_reference:
        r = result["saved_reference"] = saved_reference_bench(pipe, sets, steps, guidance)
        print(f"saved reference vs made together: largest pixel difference {r['max_abs_difference']:.2e} "
              f"(on [0, 1]); file {r['file_bytes'] / 2**20:.1f} MiB, computed once in "
              f"{r['compute_reference_seconds']:.2f} s, loaded (checksum) in {r['load_seconds']:.3f} s")
        print(header)
        row("reference + 3 targets together", r["joint"])
        row("3 targets, saved reference", r["saved"])
        for side in args.time_side or []:
            t = r.setdefault("timing", {})[side] = timing(pipe, sets if side <= 64 else sets[:4], steps, guidance,
                                                          args.rounds, side)
            joint_s, saved_s = t["seconds_per_set"]["joint"], t["seconds_per_set"]["saved"]
            rows = t["unet_rows_per_set"]
            print(f"{side}x{side}, seconds per set (median of {t['rounds']} x {t['sets']}): together {joint_s:.3f} "
                  f"({rows['joint']} UNet rows), saved reference {saved_s:.3f} ({rows['saved']} rows): "
                  f"x{saved_s / joint_s:.2f} time, x{rows['saved'] / rows['joint']:.2f} rows")
        for side in [64, 256] if args.memory_side is None else args.memory_side:
            m = r.setdefault("memory", {})[side] = memory_bench(pipe, side, guidance)
            print(f"peak working memory at {side}x{side} ({m['steps']} steps; file {m['file_bytes'] / 2**20:.1f} MiB):")
            for n, v in m["targets"].items():
                print(f"  {n} target(s): no sharing ({n + 1} images) {v['plain'] / 2**20:7.1f} MiB, together "
                      f"{v['joint'] / 2**20:7.1f} MiB, saved reference {v['saved'] / 2**20:7.1f} MiB "
                      f"(x{v['saved'] / v['joint']:.2f} of together)")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
