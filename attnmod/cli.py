"""``attnmod`` command line: a thin layer over the library's verbs (blocks, generate, scan)."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from . import guards, speed
from .loading import (
    DEFAULT_MODEL,
    EMBEDDED,
    SCHEDULERS,
    ModelLoadError,
    best_device,
    load_pipeline,
    model_fingerprint,
    model_reference,
)

_size = guards.size  # WxH, multiples of 8 (shared with the web page)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, diffusers folder, .safetensors file, 'toy' (embedded, default), 'toy-layout' (its "
                        "free-layout fine-tune, embedded) or 'tiny' / 'tiny-sdxl' / 'tiny-sd3' / 'tiny-flux' (random)")
    p.add_argument("--config", help="diffusers folder/hub id with the configs of a single-file checkpoint")
    p.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's own)")
    _speed_args(p)


def _speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the UNet (mode: default, reduce-overhead or max-autotune; default 'default')")
    p.add_argument("--offload", metavar="model|sequential",
                   help="keep the weights in CPU memory, moving each model (or layer) to the GPU as it runs")
    p.add_argument("--vae-tiling", action="store_true", help="decode the VAE in overlapping tiles (less memory)")


def _ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="render the batches on a Ray cluster (ADDRESS, e.g. auto or ray://host:10001; "
                        "alone: a local Ray on this machine); this process writes the output folder")
    p.add_argument("--ray-workers", type=guards.positive_int, default=None,
                   help="Ray workers, each holding the model once (one per GPU on a GPU cluster; default 2); "
                        "needs --ray")


def _gen_args(p: argparse.ArgumentParser, many_prompts: bool = False, required: bool | None = None) -> None:
    _model_args(p)
    p.add_argument("--prompt", required=many_prompts if required is None else required,
                   action="append" if many_prompts else "store",
                   help="text prompt" + (" (repeatable)" if many_prompts else ""))
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=guards.positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=guards.guidance, default=None,
                   help="classifier-free guidance, >= 0 (default: the model's)")
    p.add_argument("--size", type=_size, default=None, help="WxH, multiples of 8 (default: the model's native size)")
    p.add_argument("--yes", action="store_true", help="run a job above the size that asks for confirmation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnmod", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("blocks", help="list the attention blocks of a model")
    _model_args(p)
    p.add_argument("--select", default="all", help="only blocks matching this selector (e.g. U*A2)")

    p = sub.add_parser("generate", help="one image with AttnMod schedules on some blocks")
    _gen_args(p)
    p.add_argument("--seed", type=guards.seed, default=0)
    p.add_argument("--mod", action="append", default=[], metavar="BLOCK=START[:RATE[:ACCEL]]",
                   help="e.g. U1A1A2=-5:0.2, 'D1*=[1,0.8,0.6]'; repeatable")
    p.add_argument("--recipe", help="regenerate from a PNG written by attnmod (or its JSON recipe)")
    p.add_argument("--out", required=True, help="output PNG")

    p = sub.add_parser("scan", help="attention scan: a grid of start multiplier x rate (and more axes)")
    _gen_args(p, many_prompts=True)
    p.add_argument("--seed", default="0", help="seed axis: 0 or 0,1,2 or 0:9:10")
    p.add_argument("--block", action="append", help="block axis, repeatable; A+B modifies A and B together")
    p.add_argument("--start", help="start multipliers: a:b:n or v1,v2,... (1.0 always added)")
    p.add_argument("--rate", help="rates per step: a:b:n or v1,v2,... (0 always added)")
    p.add_argument("--accel", default="0", help="rate change per step: a:b:n or v1,v2,...")
    p.add_argument("--setting", action="append", metavar="START:RATE[:ACCEL]",
                   help="explicit settings as one axis instead of start x rate (repeatable; default tile first)")
    p.add_argument("--encoder-weights", action="append", metavar="W1,W2",
                   help="text encoder composition axis (SDXL: weight of each encoder's part); repeatable")
    p.add_argument("--preset", help="paper-scan, paper-scan-sdxl or zero-conditioning (options given win)")
    p.add_argument("--pair", metavar="A,B", help="scan A, B and A+B, side by side in one sheet (paper Fig. 8)")
    p.add_argument("--side-by-side", action="store_true", help="also write all sheets in one row")
    p.add_argument("--x", help="axis along x (start, mod, rate, accel, encoders, seed, prompt, block)")
    p.add_argument("--y", help="axis along y")
    p.add_argument("--batch-size", type=guards.positive_int, default=8, help="images per pipeline call")
    p.add_argument("--tile-px", type=guards.positive_int, default=None, help="display size of a tile in the grid")
    p.add_argument("--png-compression", type=int, choices=range(10), default=6, metavar="0-9",
                   help="the tiles' zlib level (lossless; default 6; 1 writes ~5x faster, ~25%% larger files)")
    p.add_argument("--out", required=True, help="output folder (re-running resumes)")
    _ray_args(p)

    p = sub.add_parser("strategy", help="greedy multi-block AttnMod (paper Fig. 9): one block gains +1 per step")
    _gen_args(p, many_prompts=True)
    p.add_argument("--seed", default="0", help="0, or several (0,1,2 or 0:9:10): one strategy per prompt and seed")
    p.add_argument("--blocks", default="all", help="candidate blocks (selector), all starting at 0")
    p.add_argument("--picker", default="most", help="most (influential) or least")
    p.add_argument("--candidate-batch", type=guards.positive_int, default=None,
                   help="candidates per UNet call (default all)")
    p.add_argument("--out", required=True, help="output PNG (its recipe remakes it without the search); with "
                                                "several prompts or seeds, a folder (re-running resumes)")
    _ray_args(p)

    p = sub.add_parser("influence", help="every block's tile at one setting vs the default, scored")
    _gen_args(p)
    p.add_argument("--seed", type=guards.seed, default=0)
    p.add_argument("--setting", default="-5:0.2", metavar="START:RATE[:ACCEL]")
    p.add_argument("--blocks", default="all", help="which blocks to map (selector)")
    p.add_argument("--batch-size", type=guards.positive_int, default=8)
    p.add_argument("--out", required=True, help="output folder (re-running resumes)")
    _ray_args(p)

    p = sub.add_parser("maps", help="cross-attention word maps, self-attention PCA and self-segmentation")
    _gen_args(p)
    p.add_argument("--seed", type=guards.seed, default=0)
    p.add_argument("--blocks", help="blocks whose attention is captured (selector; default: the model's, "
                                    "'all' but the 16x16 blocks 'D0*+U3*' on the embedded model)")
    p.add_argument("--segments", type=int, default=4, help="k of the self-attention k-means")
    p.add_argument("--label-words", nargs="+", metavar="WORD",
                   help="label segments with these prompt words only (e.g. the nouns; default: every word)")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("edit", help="Prompt-to-Prompt: edit an image by editing its prompt, keeping its layout")
    _gen_args(p)
    p.add_argument("--to", help="the edited prompt")
    p.add_argument("--seed", type=guards.seed, default=0)
    p.add_argument("--refine", action="store_true", help="the edit adds words (aligned words keep their maps)")
    p.add_argument("--cross-replace", action="append", default=[], metavar="FRACTION|WORD=FRACTION",
                   help="fraction of steps with the source's cross maps (default 0.8); WORD=FRACTION overrides it "
                        "for one word of the edited prompt (repeatable)")
    p.add_argument("--self-replace", type=float, default=0.4, help="fraction of steps with the source's self maps")
    p.add_argument("--reweight", action="append", default=[], metavar="WORD=FACTOR",
                   help="scale a word's cross-attention in the edit, inside its cross-replace window as the "
                        "reference does (repeatable; every step: --option reweight_every_step=true)")
    p.add_argument("--blend", action="append", default=[], metavar="WORD",
                   help="local blend: only where these words attend may the image change (repeatable; mask from "
                        "the cross layers at 1/4 of the latent, --option blend_downsample=N for 1/N)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="an EditOptions field, e.g. blend_downsample=1 or reweight_every_step=true (repeatable; "
                        "default: the reference code's behaviour)")
    p.add_argument("--recipe", help="remake the edit of a source.png / edit.png written by attnmod edit")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("style", help="StyleAligned: a set of images sharing the first one's (or a real image's) style")
    _gen_args(p, many_prompts=True, required=False)
    p.add_argument("--recipe", help="remake the whole set of a PNG written by attnmod style")
    p.add_argument("--style", default="", help="appended to every prompt (e.g. 'outlined style')")
    p.add_argument("--seed", type=guards.seed, default=0, help="image i uses seed + i")
    p.add_argument("--ref-image", help="a real reference image (DDIM-inverted; must have the model's size)")
    p.add_argument("--ref-prompt", help="what the reference image shows (needed with --ref-image)")
    p.add_argument("--blocks", default="self", help="self-attention blocks that share (selector, e.g. U*)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="any StyleAlignedOptions field, e.g. adain_values=true (repeatable; default: published)")
    p.add_argument("--save-reference", metavar="FILE.safetensors",
                   help="compute the reference (the first prompt, or --ref-image) once and save it for --reference")
    p.add_argument("--reference", metavar="FILE.safetensors",
                   help="a saved reference: every --prompt is a target, the reference is not run again (its steps, "
                        "guidance and size are the defaults)")
    p.add_argument("--control", action="append", default=[], metavar="IMG",
                   help="a ControlNet control image per target prompt, in order, of the output size (repeatable; "
                        "the reference gets no control)")
    p.add_argument("--controlnet", metavar="PATH",
                   help="a diffusers ControlNet folder for --control, or embedded-zero: one built from the model's "
                        "own UNet encoder, zero-initialised, so it adds nothing (a demo of the plumbing)")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale (default 1)")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("transfer", help="Cross-Image Attention: the structure image's layout in the appearance "
                                        "image's colours and textures")
    _model_args(p)
    p.add_argument("--structure", help="image whose layout and shapes are kept")
    p.add_argument("--appearance", help="image whose colours, textures and background are taken")
    for role in ("structure", "appearance"):
        p.add_argument(f"--{role}-prompt", help=f"generate the {role} image instead (DDPM steps that keep their "
                                                "noise: no inversion needed)")
        p.add_argument(f"--{role}-seed", type=guards.seed, default=0, help=f"seed of --{role}-prompt")
    p.add_argument("--noun", help="the object's noun, for the masks of masked AdaIN (default: object)")
    p.add_argument("--prompt", help="prompt of the inversions and the transfer (default: 'a photo of a NOUN'; "
                                    "the embedded model: empty)")
    p.add_argument("--seed", type=guards.seed, default=42, help="noise of the DDPM inversions")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a TransferOptions field, e.g. adain=plain or contrast=1.3 (repeatable; default: the "
                        "reference code's)")
    p.add_argument("--recipe", help="remake the transfer of a PNG written by attnmod transfer")
    p.add_argument("--yes", action="store_true", help="run a job above the size that asks for confirmation")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("layout", help="Bounded Attention / layout guidance: each subject inside its box")
    _gen_args(p, required=False)
    p.add_argument("--box", action="append", default=[], type=guards.subject_box, metavar="WORDS=X0,Y0,X1,Y1",
                   help="a subject: its words as in the prompt and its box, normalised, top-left origin "
                        "(repeatable; overlapping boxes: the shared pixels belong to both subjects)")
    p.add_argument("--method", choices=("bounded", "guidance", "none"), default="bounded",
                   help="bounded attention (default), layout guidance (Chen et al.: the cross-attention loss, no "
                        "masks) or none (the plain pipeline, same noise)")
    p.add_argument("--seed", type=guards.seed, default=0)
    p.add_argument("--images", type=guards.positive_int, default=1, help="images of the same prompt and boxes")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a BoundedOptions field, e.g. start_step_size=4 or mask_blocks=U2* (repeatable; default: "
                        "the reference code's)")
    p.add_argument("--recipe", help="remake the images of a PNG written by attnmod layout")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("panorama", help="MultiDiffusion: a wide image from overlapping windows, optionally in a "
                                        "reference's style (StyleAligned)")
    _gen_args(p, required=False)
    p.add_argument("--width", type=guards.positive_int, help="panorama width in pixels (the window's plus a multiple "
                                                              "of stride x 8)")
    p.add_argument("--height", type=guards.positive_int, help="panorama height (default: the model's size)")
    p.add_argument("--stride", type=guards.positive_int, default=8, help="latent pixels between windows (8)")
    p.add_argument("--seed", type=guards.seed, default=0)
    p.add_argument("--style-prompt", action="append", default=[],
                   help="a generated style reference: its prompt (repeatable: references anchored from left to right, "
                        "each window following the two around it)")
    p.add_argument("--style-seed", type=guards.seed, help="seed of the first --style-prompt, +1 for each next one "
                                                          "(default: --seed)")
    p.add_argument("--style-ref", action="append", default=[],
                   help="a real style reference image (DDIM-inverted; the model's size; repeatable like --style-prompt)")
    p.add_argument("--style-ref-prompt", action="append", default=[], help="what each --style-ref shows, in order")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a StyleAlignedOptions field for the shared attention, e.g. query_chunk=1024 (repeatable)")
    p.add_argument("--recipe", help="remake the panorama of a PNG written by attnmod panorama")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("ui", help="the attention explorer: a local web page (needs pip install \"attnmod[ui]\")")
    p.add_argument("--model", default=None, help="hub id, diffusers folder, .safetensors file or 'toy' (default)")
    p.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU)")
    _speed_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=guards.positive_int, default=7860, help="port (default 7860)")
    p.add_argument("--out", default="attnmod-ui", help="folder the page's results go to (scans resume there)")
    _ray_args(p)

    for name in ("generate", "scan", "strategy", "influence", "maps", "edit", "style", "transfer", "layout", "panorama"):
        sub.choices[name].add_argument("--quiet", action="store_true", help="no progress bar")
    try:
        from .toy import cli as toy_cli
    except ImportError:
        toy_cli = None
    if toy_cli is not None and hasattr(toy_cli, "register"):
        toy_cli.register(sub)
    return parser


_PROMPT_ARGS = ("prompt", "negative_prompt", "to", "ref_prompt", "structure_prompt", "appearance_prompt",
                "style_texts")


def _load(args, model: str | None = None):
    args.model = args.model or model or DEFAULT_MODEL
    guards.check_device(args.device)
    speed.check_speed(best_device(args.device, args.dtype)[0], getattr(args, "compile", None),
                      getattr(args, "offload", None))
    if args.model in EMBEDDED:  # the embedded models' grammar; a trailing full stop is dropped
        from .jobs import model_prompt

        for name in _PROMPT_ARGS:
            value = getattr(args, name, None)
            if isinstance(value, list):
                setattr(args, name, [model_prompt(args.model, v) for v in value])
            elif value:
                setattr(args, name, model_prompt(args.model, value))
    pipe = getattr(args, "pipeline", None)  # the web page runs commands on the model it has loaded
    if pipe is None:
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
                             config=args.config, compile=args.compile, offload=args.offload,
                             vae_tiling=args.vae_tiling)
    prompts = [getattr(args, n, None) for n in _PROMPT_ARGS]
    for prompt in dict.fromkeys(p for v in prompts for p in (v if isinstance(v, list) else [v]) if p):
        warning = guards.check_prompt_length(getattr(pipe, "tokenizer", None), prompt)
        if warning:
            print(warning, file=sys.stderr)
    return pipe


def _check_prompts(model: str, prompts) -> None:
    """Prompts checked before loading (the embedded model's grammar); see ``_load``."""
    if model in EMBEDDED:
        from .jobs import model_prompt

        for prompt in prompts:
            if prompt:
                model_prompt(model, prompt)


def _base_recipe(args, pipe, prompt: str, seed: int = 0):
    from .jobs import base_recipe

    recipe, warnings = base_recipe(pipe, args.model, prompt, seed, negative_prompt=args.negative_prompt,
                                   steps=args.steps, guidance=args.guidance, size=args.size)
    for warning in warnings:
        print(warning, file=sys.stderr)
    return recipe


def _recipe_model(args, recipe) -> str:
    """The model a recipe replays with: ``--model`` if given, else the one it records, which must exist."""
    if args.model:
        return args.model
    model = recipe.model
    if Path(model).is_absolute() and not Path(model).exists():
        ident = f" (model id {recipe.model_id})" if recipe.model_id else ""
        raise ValueError(f"the recipe needs the model {model}{ident}, which is not there; "
                         "give --model PATH to replay it with a copy")
    return model


def _check_replay(args, pipe, recipe) -> None:
    """Warn when a replay's model or device is not the recipe's: the image may then differ."""
    ident = model_fingerprint(args.model)
    if recipe.model_id and ident and ident != recipe.model_id:
        print(f"warning: the recipe was made with model id {recipe.model_id}, {args.model} is {ident}; "
              "the image will differ", file=sys.stderr)
    here = (str(pipe.device), str(pipe.dtype).removeprefix("torch."))
    if recipe.device and (recipe.device, recipe.dtype) != here:
        print(f"warning: the recipe was rendered on {recipe.device} ({recipe.dtype}), this run uses {here[0]} "
              f"({here[1]}); the image may differ slightly", file=sys.stderr)


def cmd_blocks(args) -> int:
    from .blocks import resolve_blocks

    pipe = _load(args)
    blocks = resolve_blocks(pipe, args.select)
    width = max(len(b.short) for b in blocks)
    for b in blocks:
        print(f"{b.short:<{width}}  {b.name}  {b.kind}")
    return 0


def cmd_generate(args) -> int:
    from dataclasses import replace as dc_replace

    from .generate import generate
    from .jobs import parse_mods
    from .modify import normalize_mods
    from .recipe import save_png

    guards.check_output_file(args.out)
    recipe = _read_recipe(args.recipe) if args.recipe else None
    if recipe is None and not args.prompt:
        raise ValueError("give --prompt (or --recipe to regenerate an image)")
    pipe = _load(args, _recipe_model(args, recipe) if recipe else None)
    if recipe is not None:
        _check_replay(args, pipe, recipe)
        _use_scheduler_class(pipe, recipe.scheduler)
        recipe = dc_replace(recipe, model=model_reference(args.model), model_id=model_fingerprint(args.model),
                            device=str(pipe.device), dtype=str(pipe.dtype).removeprefix("torch."))
    else:
        mods = parse_mods(args.mod)
        recipe = _base_recipe(args, pipe, args.prompt, args.seed).with_mods(normalize_mods(pipe, mods))
    guards.check_job_size(1, recipe.steps, recipe.width, recipe.height, args.yes)
    image = generate(pipe, recipe)
    from .blocks import list_blocks

    path = save_png(image, args.out, recipe, {b.name: b.short for b in list_blocks(pipe)})
    print(f"wrote {path}")
    return 0


def _use_scheduler_class(pipe, name: str) -> None:
    """Switch to the scheduler class a recipe was made with (same config otherwise)."""
    import diffusers

    if name and type(pipe.scheduler).__name__ != name:
        if not hasattr(diffusers, name):
            raise ValueError(f"the recipe's scheduler {name!r} is not in this diffusers version")
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)


def _read_command_recipe(path: str, command: str):
    """The recipe of an image ``attnmod <command>`` wrote, and the ``attnmod_<command>`` chunk beside it
    (read without decoding the pixels; a missing or corrupt chunk is a one-line ValueError)."""
    import json

    from .recipe import Recipe, png_text

    chunk = f"attnmod_{command}"
    text = (png_text(path) or {}).get(chunk)
    if text is None:
        raise ValueError(f"{path} was not written by attnmod {command} (no {chunk} text chunk)")
    if command == "edit":
        from .methods.p2p import EditOptions as Options

        keys, options_key = {"source": str, "target": str, "mode": str, "options": dict}, "options"
    elif command == "transfer":
        from .methods.transfer import TransferOptions as Options

        keys, options_key = {"structure": (str, dict), "appearance": (str, dict), "options": dict}, "options"
    elif command == "panorama":
        from .methods.panorama import PanoramaOptions as Options

        keys, options_key = {"style": list, "options": dict}, "options"
    elif command == "layout":
        from .methods.bounded import BoundedOptions as Options

        keys, options_key = {"subjects": list, "method": str, "options": dict, "image": int}, "options"
    else:
        from .methods.style_aligned import StyleAlignedOptions as Options

        keys, options_key = {"prompts": list, "index": int, "ref_image": (str, type(None)),
                             "ref_prompt": (str, type(None)), "style_aligned": dict}, "style_aligned"
    try:
        info = json.loads(text)
        bad = [k for k, kind in keys.items() if not isinstance(info, dict) or not isinstance(info.get(k), kind)]
        if bad:
            raise ValueError(f"{bad[0]} is missing or of the wrong type")
        options = dict(info[options_key])
        if command == "edit":
            if not isinstance(options.get("local_blend"), list):
                raise ValueError("options.local_blend is missing or not a list")
            options["local_blend"] = tuple(options["local_blend"])
        if command == "transfer":  # JSON lists back to the dataclass's tuples
            options = {k: (tuple(tuple(w) for w in v) if k == "windows" else tuple(v) if k == "adain_steps" else v)
                       for k, v in options.items()}
            info["options"] = options
        Options(**options)
    except (ValueError, TypeError, RecursionError) as e:
        raise ValueError(f"{path}: its {chunk} chunk is corrupt ({' '.join(str(e).split())})") from None
    return Recipe.from_png(path), info


def _read_recipe(path: str):
    """``--recipe``: a PNG attnmod wrote or a recipe JSON, told apart by content, checked field by field."""
    from .recipe import Recipe

    return Recipe.from_file(path)


def _sweep_from_args(args):
    from .jobs import scan_sweep

    return scan_sweep(args.prompt, seed=args.seed, blocks=args.block, start=args.start, rate=args.rate,
                      accel=args.accel, settings=args.setting or (), preset=args.preset, pair=args.pair,
                      encoder_weights=args.encoder_weights or (), x=args.x, y=args.y)


def _check_ray(args) -> None:
    """With ``--ray``: one-line errors (Ray not installed, address unreachable) before the model loads."""
    if args.ray is None and args.ray_workers is not None:
        raise ValueError("--ray-workers needs --ray (without it everything runs here, in this process)")
    args.ray_workers = args.ray_workers or 2
    if args.ray is not None:
        from .distributed import check_reachable, require_ray

        require_ray()
        check_reachable(args.ray or None)


@contextmanager
def _executor(args, device: str):
    """The executor a command renders with: the web page's own (``attnmod ui --ray``: ``args.executor``, kept
    open for its next job), a ``RayExecutor`` for ``--ray`` (one GPU per worker on CUDA; its workers end with the
    block), else None (here)."""
    if getattr(args, "executor", None) is not None:
        yield args.executor
        return
    if args.ray is None:
        yield None
        return
    from .distributed import RayExecutor

    with RayExecutor(address=args.ray or None, workers=args.ray_workers,
                     gpus_per_worker=1 if device.startswith("cuda") else 0) as executor:
        yield executor


def cmd_scan(args) -> int:
    from .jobs import scan_title
    from .sweep import plan, run_scan

    guards.check_output_dir(args.out)
    sweep = _sweep_from_args(args)
    _check_ray(args)
    pipe = _load(args)
    if not args.block and not args.pair:
        from dataclasses import replace as dc_replace

        from .dit import default_block

        sweep = dc_replace(sweep, blocks=(default_block(pipe),))  # U1A1A2, or a DiT model's middle block
    base = _base_recipe(args, pipe, args.prompt[0])
    tiles = plan(pipe, sweep, base)
    unique = len({t.recipe.key for t in tiles})
    guards.check_job_size(unique, base.steps, base.width, base.height, args.yes)
    x, y, sheets = sweep.layout()
    print(f"scan: {len(tiles)} tiles ({unique} distinct images) x {base.steps} steps = "
          f"{unique * base.steps} denoising steps; x={x}, y={y}" + (f", sheets by {', '.join(sheets)}" if sheets else ""))
    title = scan_title(sweep, base)
    with _executor(args, base.device) as executor:
        result = run_scan(pipe, sweep, base, out=args.out, batch_size=args.batch_size, progress=not args.quiet,
                          png_compression=args.png_compression,
                          tile_px=args.tile_px, title=title, side_by_side=args.side_by_side or bool(args.pair),
                          executor=executor)
    print(f"rendered {result.rendered} of {unique} images ({unique - result.pending_count} already done); "
          f"sheets: {', '.join(str(p) for p in result.sheet_files)}")
    if result.failed:
        from .generate import describe

        which = "; ".join(describe(t.recipe, result.short_names) for t in result.failed[:5])
        print(f"error: {len(result.failed)} tile(s) came out non-finite (NaN/inf), not written: {which}",
              file=sys.stderr)
        return 3
    return 0


def cmd_strategy(args) -> int:
    from dataclasses import replace as dc_replace

    from .blocks import list_blocks
    from .recipe import save_png
    from .strategy import get_picker, run_strategies, strategy_file

    get_picker(args.picker)  # fail before loading anything
    seeds = guards.seed_values(args.seed)
    many = len(args.prompt) * len(seeds) > 1
    if many and Path(args.out).suffix.lower() == ".png":
        raise ValueError(f"{len(args.prompt)} prompt(s) x {len(seeds)} seed(s) make one image each: --out names a "
                         f"folder for them, not {args.out}")
    (guards.check_output_dir if many else guards.check_output_file)(args.out)
    _check_ray(args)
    pipe = _load(args)
    first = _base_recipe(args, pipe, args.prompt[0], seeds[0])
    bases = [dc_replace(first, prompt=prompt, seed=seed) for prompt in args.prompt for seed in seeds]
    guards.check_job_size(len(bases), first.steps, first.width, first.height, args.yes)
    short = {b.name: b.short for b in list_blocks(pipe)}
    progress = None if args.quiet or not many else (
        lambda done, total: print(f"strategy {done}/{total}", file=sys.stderr))
    with _executor(args, first.device) as executor:
        if many:
            run_strategies(pipe, bases, blocks=args.blocks, picker=args.picker, candidate_batch=args.candidate_batch,
                           out=args.out, executor=executor, progress=progress)
            print(f"wrote {len(bases)} strategies to {args.out}/ ({strategy_file(0, bases[0])}, ...; "
                  "strategies.json lists each one's prompt, seed and block order)")
            return 0
        [result] = run_strategies(pipe, bases, blocks=args.blocks, picker=args.picker,
                                  candidate_batch=args.candidate_batch, executor=executor)
    path = save_png(result.image, args.out, result.recipe, short)
    order = " ".join(short.get(n, "-") if n else "-" for n in result.order)
    print(f"wrote {path}\nblock gaining +1 at each step: {order}")
    return 0


def cmd_influence(args) -> int:
    from .blocks import resolve_blocks
    from .influence import block_influence
    from .schedule import Schedule

    setting = Schedule.parse(args.setting)
    guards.check_output_dir(args.out)
    _check_ray(args)
    pipe = _load(args)
    base = _base_recipe(args, pipe, args.prompt, args.seed)
    blocks = resolve_blocks(pipe, args.blocks)
    guards.check_job_size(len(blocks) + 1, base.steps, base.width, base.height, args.yes)
    with _executor(args, base.device) as executor:
        result = block_influence(pipe, base, setting, blocks=args.blocks, out=args.out, batch_size=args.batch_size,
                                 progress=not args.quiet, executor=executor)
    top = ", ".join(f"{b} {s:.3f}" for b, s in result.ranking()[:5])
    print(f"wrote {args.out}/influence.png; most influential at {setting.to_text()}: {top}")
    return 0


def cmd_maps(args) -> int:
    from .defaults import model_defaults
    from .generate import generate
    from .grid import make_grid
    from .maps import trace
    from .recipe import save_png, to_pil, write_image
    from .segment import self_segmentation
    from .tokenizer import split_words

    guards.check_output_dir(args.out)
    pipe = _load(args)
    recipe = _base_recipe(args, pipe, args.prompt, args.seed)
    guards.check_job_size(1, recipe.steps, recipe.width, recipe.height, args.yes)
    from .dit import is_dit

    if is_dit(pipe):  # SD3 / FLUX: the image-query rows of the joint attention
        from .dit.maps import trace
    with trace(pipe, blocks=args.blocks or model_defaults(pipe)["maps_blocks"]) as tc:
        image = to_pil(generate(pipe, recipe))
    maps = tc.result(recipe.prompt)
    segmentation = self_segmentation(maps, k=args.segments, words=args.label_words)  # checks k and the words first
    out = Path(args.out)
    save_png(image, out / "image.png", recipe)
    words = list(dict.fromkeys(w for w, _ in split_words(maps.tokens[0]) if w.isalpha()))
    sheet = make_grid([[image] + [maps.overlay(image, w) for w in words]], ["image"] + words, [""],
                      title=f"cross-attention per word: {recipe.prompt!r}", tile_px=max(128, image.width))
    pca = maps.self_attention_pca().resize((256, 256), Image.NEAREST)
    for name, im in (("words.png", sheet), ("self-attention-pca.png", pca), ("segments.png", segmentation.image())):
        write_image(out / name, im)
    for s, legend in enumerate(segmentation.legend):
        print(f"segment {s}: " + ", ".join(f"{w} {score:.2f}" for w, score in legend[:3]))
    print(f"wrote {out}/image.png, words.png, self-attention-pca.png, segments.png")
    return 0


def _cross_replace(items: list[str]) -> float | dict[str, float]:
    """``--cross-replace`` values -> ``EditOptions.cross_replace_steps``: a fraction, or per word with
    the default under ``"default_"`` (Prompt-to-Prompt's form)."""
    fractions: dict[str, float] = {"default_": 0.8}
    for item in items:
        word, sep, value = item.rpartition("=")
        try:
            fractions[word if sep else "default_"] = float(value)
        except ValueError:
            raise ValueError(f"--cross-replace expects a fraction or WORD=FRACTION, got {item!r}") from None
    return fractions if len(fractions) > 1 else fractions["default_"]


def cmd_edit(args) -> int:
    from dataclasses import asdict
    from dataclasses import replace as dc_replace

    from .grid import side_by_side
    from .methods.p2p import EditOptions, edit
    from .options import with_settings
    from .recipe import save_png, to_pil, write_image

    guards.check_output_dir(args.out)
    if args.recipe:  # remake the edit exactly: prompts, seed, sampling and options from the PNG
        recipe, info = _read_command_recipe(args.recipe, "edit")
        args.prompt, args.to, args.refine = info["source"], info["target"], info["mode"] == "refine"
        args.seed, args.steps, args.guidance = recipe.seed, recipe.steps, recipe.guidance
        args.size, args.negative_prompt = (recipe.width, recipe.height), recipe.negative_prompt
        args.model = _recipe_model(args, recipe)
        options = EditOptions(**{**info["options"], "local_blend": tuple(info["options"]["local_blend"])})
    else:
        if not args.prompt or not args.to:
            raise ValueError("give --prompt and --to (or --recipe to remake an edit)")
        reweight = dict(guards.factor("--reweight", item) for item in args.reweight)
        options = with_settings(EditOptions(_cross_replace(args.cross_replace), args.self_replace, reweight,
                                            local_blend=tuple(args.blend)), args.option)
    pipe = _load(args)
    if args.recipe:
        _check_replay(args, pipe, recipe)
    _check_prompts(args.model, [args.to])
    recipe = _base_recipe(args, pipe, args.prompt, args.seed)
    guards.check_job_size(2, recipe.steps, recipe.width, recipe.height, args.yes)
    mode = "refine" if args.refine else "swap"
    result = edit(pipe, recipe.prompt, args.to, seed=recipe.seed, steps=recipe.steps, guidance=recipe.guidance,
                  width=recipe.width, height=recipe.height, options=options, mode=mode)
    out = Path(args.out)
    info = {"source": recipe.prompt, "target": args.to, "mode": mode, "options": asdict(options)}
    save_png(result.source, out / "source.png", recipe, extra={"attnmod_edit": {**info, "image": "source"}})
    save_png(result.edited, out / "edit.png", dc_replace(recipe, prompt=args.to),
             extra={"attnmod_edit": {**info, "image": "edit"}})
    size = max(256, recipe.width)
    pair = side_by_side([to_pil(im).resize((size, size), Image.NEAREST) for im in (result.source, result.edited)],
                        gap=8)
    write_image(out / "side-by-side.png", pair)
    print(f"wrote {out}/source.png, edit.png, side-by-side.png")
    return 0


def cmd_style(args) -> int:
    import math
    from dataclasses import replace as dc_replace

    from .grid import side_by_side
    from .methods.style_aligned import (
        StyleAlignedOptions,
        check_controls,
        controlnet_pipeline,
        generate_style_set,
        load_controlnet,
        zero_controlnet,
    )
    from .methods.style_reference import StyleReference, compute_reference
    from .recipe import save_png, to_pil, write_image

    guards.check_output_dir(args.out)
    recipe, info = _read_command_recipe(args.recipe, "style") if args.recipe else (None, {})
    computed = bool(args.save_reference)  # the reference run alone, then the targets against it
    if recipe is not None:  # remake the set exactly: prompts, seeds, sampling, options, reference, controls
        kinds = {"seed": int, "reference_mode": str, "reference_file": (str, type(None)), "controls": (list, type(None)),
                 "controlnet": (str, type(None)), "control_scale": (int, float)}
        bad = [k for k, kind in kinds.items() if k in info and not isinstance(info[k], kind)]
        if bad:
            raise ValueError(f"{args.recipe}: its attnmod_style chunk is corrupt ({bad[0]} is of the wrong type)")
        args.prompt, args.style, args.ref_image, args.ref_prompt = info["prompts"], "", info["ref_image"], info[
            "ref_prompt"]
        args.seed, args.steps, args.guidance = info.get("seed", recipe.seed - info["index"]), recipe.steps, \
            recipe.guidance
        args.size, args.negative_prompt = (recipe.width, recipe.height), recipe.negative_prompt
        args.model = _recipe_model(args, recipe)
        args.reference, args.save_reference = info.get("reference_file"), None
        computed = info.get("reference_mode") == "computed"  # remade the same way, without writing the file
        args.control, args.controlnet = info.get("controls") or [], info.get("controlnet")
        args.control_scale = info.get("control_scale", 1.0)
    if args.reference and (args.ref_image or args.ref_prompt or computed):
        raise ValueError("--reference replays a saved reference: no --ref-image, --ref-prompt or --save-reference")
    if not args.prompt and not (computed and args.ref_image):
        raise ValueError("give at least one --prompt (or --recipe)")
    if args.save_reference:
        guards.check_output_file(args.save_reference, "--save-reference", (".safetensors",))
    if bool(args.control) != bool(args.controlnet):
        raise ValueError("--control images need --controlnet (a diffusers ControlNet folder, or embedded-zero), and "
                         "--controlnet needs --control images, one per target prompt")
    if not math.isfinite(args.control_scale) or args.control_scale < 0:
        raise ValueError(f"--control-scale must be a finite number >= 0, got {args.control_scale}")
    if args.controlnet not in (None, "embedded-zero") and not (Path(args.controlnet) / "config.json").is_file():
        raise ValueError(f"--controlnet {args.controlnet}: not a diffusers ControlNet folder (no config.json)")
    prompts = [", ".join(p for p in (prompt, args.style) if p) for prompt in args.prompt or []]
    reference = None
    if args.ref_image:
        try:
            with Image.open(args.ref_image) as im:
                reference = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the reference image {args.ref_image}: {e}") from None
    controls = [_read_image(path, "--control") for path in args.control]
    saved = StyleReference.load(args.reference) if args.reference else None
    if saved is not None:  # checked whole before the model loads; its sampling is the default
        saved.check(model=args.model or DEFAULT_MODEL)
        args.steps = args.steps or saved.info.steps
        args.guidance = saved.info.guidance if args.guidance is None else args.guidance
        args.size = args.size or (saved.info.width, saved.info.height)
        saved.check(width=args.size[0], height=args.size[1], steps=args.steps, guidance=args.guidance)
    args.prompt = prompts + ([args.ref_prompt] if args.ref_prompt else [])
    pipe = _load(args)
    if recipe is not None:
        _check_replay(args, pipe, recipe)
    base = _base_recipe(args, pipe, prompts[0] if prompts else args.ref_prompt, args.seed)
    options = (StyleAlignedOptions(**info["style_aligned"]) if recipe
               else StyleAlignedOptions(blocks=args.blocks).with_settings(args.option))
    if computed and options.reference != 0:
        raise ValueError("with --save-reference the first prompt (or --ref-image) is the reference: leave the "
                         "option reference at 0")
    targets = prompts[1:] if saved is None and reference is None else prompts  # the first prompt: the reference
    if args.controlnet:
        check_controls(controls, len(targets), base.width, base.height)
    guards.check_job_size(len(prompts) + bool(reference), base.steps, base.width, base.height, args.yes)
    run = pipe
    if args.controlnet:
        controlnet = zero_controlnet(pipe) if args.controlnet == "embedded-zero" else load_controlnet(
            args.controlnet, pipe)
        run = controlnet_pipeline(pipe, controlnet)
    sampling = {"seed": base.seed, "steps": base.steps, "guidance": base.guidance, "width": base.width,
                "height": base.height, "options": options, "controls": controls or None,
                "control_scale": args.control_scale}
    if computed:
        saved = compute_reference(pipe, args.ref_prompt if reference is not None else prompts[0], seed=base.seed,
                                  steps=base.steps, guidance=base.guidance, width=base.width, height=base.height,
                                  image=reference, options=options, model=args.model)
        if args.save_reference:
            saved.save(args.save_reference)
    if saved is not None:
        images = generate_style_set(run, targets, saved_reference=saved, **sampling)
        names = [saved.info.prompt, *targets]
    else:
        images = generate_style_set(run, prompts, reference_image=reference, reference_prompt=args.ref_prompt,
                                    **sampling)
        names = ([args.ref_prompt] if reference is not None else []) + prompts
    mode = "file" if args.reference else "computed" if computed else "joint"
    set_info = {"style_aligned": options.__dict__, "prompts": prompts, "seed": base.seed, "ref_image": args.ref_image,
                "ref_prompt": args.ref_prompt, "reference_mode": mode,
                "reference_file": str(Path(args.reference).resolve()) if args.reference else None,
                "controls": [str(Path(c).resolve()) for c in args.control] or None,
                "controlnet": (args.controlnet if args.controlnet in (None, "embedded-zero")
                               else str(Path(args.controlnet).resolve())), "control_scale": args.control_scale}
    out = Path(args.out)
    tiles = []
    for i, (image, prompt) in enumerate(zip(images, names, strict=True)):
        seed = saved.info.seed if mode == "file" and i == 0 and saved.info.seed is not None else base.seed + i
        save_png(image, out / f"{i:02d}.png", dc_replace(base, prompt=prompt, seed=seed),
                 extra={"attnmod_style": {**set_info, "index": i}})
        tiles.append(to_pil(image).resize((max(256, base.width),) * 2, Image.NEAREST))
    row = side_by_side(tiles, gap=8)
    write_image(out / "grid.png", row)
    saved_to = f"; saved the reference to {args.save_reference}" if args.save_reference else ""
    print(f"wrote {len(images)} images (reference first) and {out}/grid.png{saved_to}")
    return 0


def _read_image(path: str, flag: str) -> Image.Image:
    """An input image as RGB, or a one-line error naming the flag and the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot read the image ({e})") from None


def cmd_transfer(args) -> int:
    from dataclasses import asdict, fields
    from dataclasses import replace as dc_replace

    from .defaults import model_defaults
    from .grid import side_by_side
    from .inversion.ddpm import ddpm_generate
    from .methods.transfer import TransferOptions, transfer
    from .options import with_settings
    from .recipe import save_png, to_pil, write_image

    guards.check_output_dir(args.out)
    info = {}
    if args.recipe:  # remake exactly: inputs, options, model and seed from the PNG
        recipe, info = _read_command_recipe(args.recipe, "transfer")
        for role in ("structure", "appearance"):
            given = info[role]
            setattr(args, role, given if isinstance(given, str) else None)
            setattr(args, f"{role}_prompt", None if isinstance(given, str) else str(given.get("prompt", "")))
            setattr(args, f"{role}_seed", 0 if isinstance(given, str) else int(given.get("seed", 0)))
        args.model = _recipe_model(args, recipe)
    images = {}
    for role in ("structure", "appearance"):
        path, prompt = getattr(args, role), getattr(args, f"{role}_prompt")
        if bool(path) == bool(prompt):
            raise ValueError(f"give --{role} IMAGE or --{role}-prompt PROMPT (one of them)")
        images[role] = _read_image(path, f"--{role}") if path else None
    if args.recipe:
        options = TransferOptions(**info["options"])
    else:
        options = with_settings(TransferOptions(seed=args.seed), args.option)
    args.prompt = options.prompt if args.recipe else args.prompt
    pipe = _load(args)
    if args.recipe:
        _check_replay(args, pipe, recipe)
    else:
        named = {f.name for f in fields(TransferOptions)}
        model = {k: v for k, v in model_defaults(pipe).get("transfer", {}).items() if k in named}
        given = {n.partition("=")[0].strip().replace("-", "_") for n in args.option}
        flags = {k: v for k, v in (("noun", args.noun), ("prompt", args.prompt)) if v is not None}
        options = dc_replace(options, **{k: v for k, v in model.items() if k not in given}, **flags)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for role, im in images.items():
        if im is not None and im.size != (size, size):
            raise ValueError(f"--{role} {getattr(args, role)} is {im.width}x{im.height}; this model makes "
                             f"{size}x{size} images: resize it first")
    guards.check_job_size(3 * 2, options.steps, size, size, args.yes)
    inputs = {}
    for role in ("structure", "appearance"):
        if images[role] is None:  # generated: its own DDPM noise replays it, no inversion
            images[role], inputs[role] = ddpm_generate(pipe, getattr(args, f"{role}_prompt"),
                                                       getattr(args, f"{role}_seed"), steps=options.steps,
                                                       guidance=options.inversion_guidance)
        else:
            inputs[role] = images[role]
    structure, appearance = images["structure"], images["appearance"]
    result = transfer(pipe, inputs["structure"], inputs["appearance"], options)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    out = Path(args.out)
    args.size, args.negative_prompt, args.steps, args.guidance = (size, size), "", options.steps, options.swap_guidance
    base = _base_recipe(args, pipe, options.text, options.seed)
    info = {role: (str(Path(getattr(args, role)).resolve()) if getattr(args, role) else
                   {"prompt": getattr(args, f"{role}_prompt"), "seed": getattr(args, f"{role}_seed")})
            for role in ("structure", "appearance")}
    info["options"] = asdict(options)
    for name, image in (("output", result.output), ("structure", result.structure),
                        ("appearance", result.appearance)):
        save_png(image, out / f"{name}.png", base, extra={"attnmod_transfer": {**info, "image": name}})
    tile = max(256, size)
    sheet = side_by_side([im.resize((tile, tile), Image.NEAREST) for im in
                          (structure, appearance, to_pil(result.output))], gap=8)
    write_image(out / "side-by-side.png", sheet)
    print(f"wrote {out}/output.png, structure.png, appearance.png (reconstructions), side-by-side.png "
          "(structure | appearance | output)")
    return 0


def cmd_layout(args) -> int:
    from dataclasses import asdict
    from dataclasses import replace as dc_replace

    from .methods.bounded import BoundedOptions, Subject, bounded, layout_guidance, overlay
    from .options import with_settings
    from .recipe import save_png

    guards.check_output_dir(args.out)
    recipe, info = _read_command_recipe(args.recipe, "layout") if args.recipe else (None, {})
    if recipe is not None:  # remake exactly: prompt, boxes, method, options, sampling from the PNG
        try:
            args.box = [Subject(str(w), tuple(b)) for w, b in info["subjects"]]
        except (TypeError, ValueError) as e:
            raise ValueError(f"{args.recipe}: its attnmod_layout chunk is corrupt ({e})") from None
        args.prompt, args.method, args.seed = recipe.prompt, info["method"], recipe.seed - info["image"]
        args.steps, args.guidance = recipe.steps, recipe.guidance
        args.size, args.negative_prompt = (recipe.width, recipe.height), recipe.negative_prompt
        args.model = _recipe_model(args, recipe)
        options = BoundedOptions(**info["options"])
    else:
        options = with_settings(BoundedOptions(), args.option)
    if not args.prompt:
        raise ValueError("give --prompt (or --recipe)")
    if args.method != "none" and not args.box:
        raise ValueError("give at least one --box WORDS=X0,Y0,X1,Y1 (or --method none)")
    args.steps = args.steps or 50  # the reference's 50 steps: 15 guided, masks refined from step 15
    pipe = _load(args)
    if recipe is not None:
        _check_replay(args, pipe, recipe)
    base = _base_recipe(args, pipe, args.prompt, args.seed)
    guards.check_job_size(args.images, base.steps, base.width, base.height, args.yes)
    if recipe is None:  # the model's own layout settings (the embedded model's blocks), unless --option sets them
        from dataclasses import fields

        from .defaults import model_defaults

        named = {f.name for f in fields(BoundedOptions)}
        given = {n.partition("=")[0].strip().replace("-", "_") for n in args.option}
        model = {k: v for k, v in model_defaults(pipe).get("layout", {}).items() if k in named and k not in given}
        options = dc_replace(options, **model)
    run = {"bounded": bounded, "guidance": layout_guidance, "none": bounded}[args.method]
    subjects = [] if args.method == "none" else args.box
    progress = None if args.quiet else (lambda step, it, loss: print(f"step {step} iteration {it}: loss {loss:.3f}",
                                                                     file=sys.stderr))
    result = run(pipe, base.prompt, subjects, options, steps=base.steps, guidance=base.guidance, seed=base.seed,
                 images=args.images, height=base.height, width=base.width,
                 negative_prompt=base.negative_prompt or None, callback=progress)
    out = Path(args.out)
    written = []
    for i, image in enumerate(result.images):
        suffix = f"-{i}" if args.images > 1 else ""
        chunk = {"attnmod_layout": {"subjects": [[s.words, list(s.box)] for s in args.box], "method": args.method,
                                    "options": asdict(options), "image": i}}
        recipe_i = dc_replace(base, seed=base.seed + i)
        masks = result.masks[i] if result.masks.numel() else None
        written.append(save_png(image, out / f"image{suffix}.png", recipe_i, extra=chunk))
        written.append(save_png(overlay(image, args.box, masks), out / f"overlay{suffix}.png", recipe_i, extra=chunk))
    print(f"wrote {', '.join(str(p) for p in written)} (overlay: the boxes and the final masks)")
    return 0


def cmd_panorama(args) -> int:
    from dataclasses import replace as dc_replace

    from .methods.panorama import PanoramaOptions, StyleRef, panorama
    from .methods.style_aligned import StyleAlignedOptions
    from .recipe import save_png

    guards.check_output_dir(args.out)
    recipe, info = _read_command_recipe(args.recipe, "panorama") if args.recipe else (None, {})
    if recipe is not None:  # remake exactly: prompt, size, windows, style references from the PNG
        try:
            refs = [dict(r) for r in info["style"]]
            args.style_prompt = [str(r["prompt"]) for r in refs if "image" not in r]
            args.style_ref = [str(r["image"]) for r in refs if "image" in r]
            args.style_ref_prompt = [str(r["prompt"]) for r in refs if "image" in r]
            seeds = [r.get("seed") for r in refs if "image" not in r]
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{args.recipe}: its attnmod_panorama chunk is corrupt ({e})") from None
        args.style_seed = seeds[0] if seeds else None
        args.prompt, args.seed, args.width, args.height = recipe.prompt, recipe.seed, recipe.width, recipe.height
        args.steps, args.guidance, args.negative_prompt = recipe.steps, recipe.guidance, recipe.negative_prompt
        args.stride = int(info["options"].get("stride", 8))
        args.option = [f"{k}={'none' if v is None else v}" for k, v in info.get("style_aligned", {}).items()]
        args.model = _recipe_model(args, recipe)
    if not args.prompt or not args.width:
        raise ValueError("give --prompt and --width (or --recipe)")
    if len(args.style_ref) != len(args.style_ref_prompt):
        raise ValueError(f"give one --style-ref-prompt per --style-ref (describing it, for its inversion): "
                         f"{len(args.style_ref)} images, {len(args.style_ref_prompt)} prompts")
    if args.style_ref and args.style_prompt:
        raise ValueError("give --style-prompt or --style-ref references, not both")
    style_options = StyleAlignedOptions().with_settings(args.option)
    if args.option and not (args.style_ref or args.style_prompt):
        raise ValueError("--option sets the shared attention of a styled panorama: give --style-prompt or --style-ref")
    images = [_read_image(path, "--style-ref") for path in args.style_ref]
    args.ref_prompt = None
    args.style_texts = args.style_prompt or args.style_ref_prompt  # checked against the model's grammar by _load
    pipe = _load(args)
    if recipe is not None:
        _check_replay(args, pipe, recipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    args.size = (size, size)  # the windows are the model's native size
    base = dc_replace(_base_recipe(args, pipe, args.prompt, args.seed), width=args.width,
                      height=args.height or size)
    guards.check_job_size(1, base.steps, base.width, base.height, args.yes)
    options = PanoramaOptions(stride=args.stride)
    first = base.seed if args.style_seed is None else args.style_seed
    if images:
        refs = [StyleRef(p, image=im) for p, im in zip(args.style_texts, images, strict=True)]
        style = [{"prompt": p, "image": str(Path(path).resolve())} for p, path in zip(args.style_texts,
                                                                                     args.style_ref, strict=True)]
    else:
        refs = [StyleRef(p, seed=first + k) for k, p in enumerate(args.style_texts)]
        style = [{"prompt": r.prompt, "seed": r.seed} for r in refs]
    progress = None if args.quiet else (lambda i, x: print(f"step {i + 1}/{base.steps}", file=sys.stderr))
    result = panorama(pipe, base.prompt, base.width, base.height, steps=base.steps, guidance=base.guidance,
                      seed=base.seed, negative_prompt=base.negative_prompt, options=options, references=refs,
                      style=style_options, callback=progress)
    changed = {k: v for k, v in style_options.__dict__.items() if v != getattr(StyleAlignedOptions(), k)}
    chunk = {"attnmod_panorama": {"style": style, "options": {"stride": options.stride}, "style_aligned": changed}}
    out = Path(args.out)
    written = [save_png(result.image, out / "panorama.png", base, extra=chunk)]
    for k, (ref, image) in enumerate(zip(refs, result.references, strict=True)):
        ref_recipe = dc_replace(base, prompt=ref.prompt, width=size, height=size,
                                seed=ref.seed if ref.seed is not None else base.seed)
        name = "reference.png" if len(refs) == 1 else f"reference-{k}.png"
        written.append(save_png(image, out / name, ref_recipe, extra=chunk))
    print(f"wrote {', '.join(str(p) for p in written)} ({len(result.views)} windows)")
    return 0


def cmd_ui(args) -> int:
    try:
        from . import ui
        ui.require_gradio()
    except ImportError as e:
        raise ValueError(str(e)) from None
    guards.check_device(args.device)
    device = best_device(args.device, args.dtype)[0]
    speed.check_speed(device, args.compile, args.offload)
    guards.check_output_dir(args.out)
    _check_ray(args)
    with _executor(args, device) as executor:  # the page's scans, influence maps and strategies, with --ray
        if executor is not None:
            executor.start()  # one-line errors (workers the cluster cannot place, versions) before serving
        demo, session = ui.create(args.model, args.out, device=args.device, dtype=args.dtype, executor=executor,
                                  compile=args.compile, offload=args.offload, vae_tiling=args.vae_tiling)
        on_ray = f"; scans on {args.ray_workers} Ray worker(s)" if executor is not None else ""
        print(f"attnmod ui: serving model {session.model} on http://{args.host}:{args.port} (Ctrl-C stops); "
              f"results go to {session.out_dir}{on_ray}", file=sys.stderr)
        ui.launch(demo, session, host=args.host, port=args.port, block=True)
    return 0


COMMANDS = {"ui": cmd_ui, "blocks": cmd_blocks, "maps": cmd_maps, "edit": cmd_edit, "style": cmd_style, "generate": cmd_generate, "scan": cmd_scan, "strategy": cmd_strategy,
            "influence": cmd_influence, "transfer": cmd_transfer, "layout": cmd_layout, "panorama": cmd_panorama}


_VALUE_OPTIONS = ("--start", "--rate", "--accel", "--setting", "--seed", "--mod")


def _glue_negative_values(argv: list[str]) -> list[str]:
    """``--start -20:50:8`` -> ``--start=-20:50:8`` (argparse would take -20:50:8 for an option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _quiet_libraries() -> None:
    """The CLI's own output only: silence import-time notices of transformers/diffusers."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(_glue_negative_values(list(sys.argv[1:] if argv is None else argv)))
    handler = COMMANDS.get(args.command) or args.func  # toy subcommands set func
    try:
        return handler(args) or 0
    except (ValueError, ModelLoadError, FileNotFoundError) as e:
        print(f"attnmod {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a failed write (disk full, permissions) mid-run: finished files are kept
        print(f"attnmod {args.command}: error: {guards.describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished tiles are kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
