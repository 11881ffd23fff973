"""``train-toy`` and ``eval-toy`` subcommands: thin argparse layers over ``train`` and ``evaluate``.

``register(subparsers)`` adds both to an existing CLI; ``main(argv)`` runs them standalone
(``python -m attnmod.toy.cli train-toy ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from attnmod import guards
from attnmod.toy.model import SHIPPED


def _train(args: argparse.Namespace) -> int:
    from attnmod.toy.train import TrainConfig, finetune_config, train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    guards.check_output_dir(args.workdir, "--workdir")
    if args.export is None:  # a fine-tune never overwrites the shipped model unless told to
        args.export = str(SHIPPED) if args.finetune_from is None else f"{args.workdir}/export"
    if not args.no_export:
        guards.check_output_dir(args.export, "--export")
    cfg = TrainConfig() if args.finetune_from is None else finetune_config(args.finetune_from)
    overrides = {k: getattr(args, k) for k in ("seed", "steps", "vae_steps", "batch", "lr", "cache_size",
                                               "export_every", "ckpt_every", "zero_snr_from",
                                               "decoder_steps", "warmup", "layout_share", "place_dropout")
                 if getattr(args, k) is not None}
    cfg = replace(cfg, **overrides)
    t0 = time.time()
    last = {}

    def log(info: dict) -> None:
        last.update(info)
        if args.log_every and info["step"] % args.log_every == 0:
            print(json.dumps({**info, "wall_s": round(time.time() - t0, 1)}), flush=True)

    export_to = None if args.no_export else args.export
    if args.export_only:
        from attnmod.toy.train import export_checkpoint

        step = export_checkpoint(args.workdir, args.export)
        print(json.dumps({"exported": args.export, "step": step}), flush=True)
        return 0
    train(cfg, workdir=args.workdir, export_to=export_to, device=args.device, progress=not args.no_progress,
          callback=log)
    print(json.dumps({"done": True, **last, "wall_s": round(time.time() - t0, 1)}), flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from attnmod.toy.evaluate import EvalConfig, evaluate

    if args.out:
        guards.check_output_file(args.out, suffixes=(".json",))
    cfg = EvalConfig(n_prompts=args.n, steps=args.steps, guidance=args.guidance,
                     sweep=tuple(args.sweep) if args.sweep else (), seed=args.seed,
                     layout_prompts=args.layout)
    result = evaluate(args.model, cfg, progress=not args.no_progress)
    text = json.dumps(result.to_dict(), indent=2)
    print(text)
    if args.out:
        from attnmod.recipe import atomic_write

        atomic_write(args.out, lambda f: f.write((text + "\n").encode()))
    return 0


def register(subparsers) -> None:
    """Add ``train-toy`` and ``eval-toy`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("train-toy", help="train (or resume) the embedded toy model",
                              description="Train the toy model: VAE, then UNet + text encoder, then the "
                                          "decoder; or fine-tune a trained one (--finetune-from). Resumes from "
                                          "WORKDIR/ckpt.pt when present.")
    p.add_argument("--workdir", default=".train", help="checkpoints and latent cache (default: .train)")
    p.add_argument("--export", help="folder the pipeline is exported to (default: the shipped model; with "
                   "--finetune-from: WORKDIR/export)")
    p.add_argument("--no-export", action="store_true", help="do not export the pipeline")
    p.add_argument("--export-only", action="store_true",
                   help="only export the EMA weights of WORKDIR/ckpt.pt to --export, no training")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="UNet + text-encoder steps in total (default 21500)")
    p.add_argument("--vae-steps", type=int, help="VAE steps in total (default 2000)")
    p.add_argument("--decoder-steps", type=int, help="decoder fine-tune steps after the UNet phase (default 3000)")
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--cache-size", type=int)
    p.add_argument("--export-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--zero-snr-from", type=int, help="UNet step from which the noise schedule has zero terminal "
                   "SNR (default 4600, as the shipped run; 0: from the start)")
    p.add_argument("--finetune-from", metavar="FOLDER",
                   help="fine-tune this diffusers folder's UNet + text encoder (its VAE frozen, no VAE/decoder "
                        "phase) on anchored + free-layout scenes; defaults: attnmod.toy.train.FINETUNE "
                        "(lr 2e-4, 100 warm-up steps, 10000 steps, layout share 0.5, place dropout 0.2)")
    p.add_argument("--layout-share", type=float, help="fine-tune: share of free-layout scenes in the cache (0.5)")
    p.add_argument("--place-dropout", type=float,
                   help="fine-tune: how often anchored captions drop their place clause (0.2)")
    p.add_argument("--warmup", type=int, help="learning-rate warm-up steps (default 200; fine-tune 100)")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 is best on a shared 2-core machine)")
    p.add_argument("--log-every", type=int, default=100, help="print a JSON line every N steps (0: never)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)

    e = subparsers.add_parser("eval-toy", help="measure how faithfully the toy model follows prompts",
                              description="Generate images for held-out prompts and check colour, background, "
                                          "position and shape from the images alone.")
    e.add_argument("--model", default=str(SHIPPED), help="diffusers folder (default: shipped toy model)")
    e.add_argument("--n", type=guards.positive_int, default=100, help="prompts per object count (default 100)")
    e.add_argument("--steps", type=guards.positive_int, default=20)
    e.add_argument("--guidance", type=float, default=None, help="default: the model's default guidance")
    e.add_argument("--sweep", type=float, nargs="*", help="guidance scales to sweep (1-object prompts)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--layout", type=int, default=0, metavar="N",
                   help="also score N free-layout prompts (no place words) per object count 1, 2, 3 (default 0)")
    e.add_argument("--out", help="also write the JSON result here")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_eval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnmod.toy.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
