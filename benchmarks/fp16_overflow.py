"""fp16 overflow thresholds of AttnMod multipliers, per attention block (attn1 and attn2), both signs.

    OMP_NUM_THREADS=1 python benchmarks/fp16_overflow.py --arch toy            # the embedded model
    OMP_NUM_THREADS=1 python benchmarks/fp16_overflow.py --arch sd15           # SD1.5 architecture, random weights
    OMP_NUM_THREADS=1 python benchmarks/fp16_overflow.py --arch sdxl --dtype bfloat16 --check 4

The largest finite fp16 value is 65504. For every (block, sign) the script finds the multiplier ``m`` at which the
largest |activation| anywhere in one UNet call (every leaf module's inputs and outputs: the residual streams, the
scaled block's output, the UNet output) reaches 65504, by a few Newton steps on the measured maxima (the maxima
grow about linearly with |m| once the scaled block dominates): one batched UNet call per step, one row per
(block, sign), measured in ``--dtype`` (fp32; bf16 has fp32's range and halves the memory of SDXL). It also gives
the multipliers at which the scaled product ``m * attention`` (``to_out``'s input) and the scaled block's *own*
output (``to_out``'s output) pass 65504: where neither is the threshold, the overflow starts downstream. Then it checks the prediction in
real fp16 (the ``--check N`` pairs with the lowest thresholds; -1: all): at 0.9x and 1.1x
the predicted threshold, is the fp16 UNet output (and the block's output) finite? (A threshold above 65504 cannot
be reached in fp16: the multiplier itself is inf there; such a block is checked at 65504 instead of 0.9x.)

One UNet call on N(0, 1) latents at the first timestep (999) of a 1000-step schedule; text: the embedded model's
own encoder on its prompt, random N(0, 1) embeddings for the random-weight architectures. Random weights are not a
trained checkpoint's; the numbers show where fp16 gives out and how the blocks compare, not a trained model's exact
thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as dlogging  # noqa: E402

import attnmod  # noqa: E402
from attnmod.blocks import list_blocks  # noqa: E402
from attnmod.modify import AttnMod, fp32_fallback  # noqa: E402
from attnmod.schedule import Schedule  # noqa: E402

dlogging.set_verbosity_error()
FP16_MAX = 65504.0
CONFIGS = Path(attnmod.__file__).parent / "configs"


def build(arch: str, dtype: torch.dtype, side: int):
    """(unet, call kwargs for one row) for ``arch`` in ``dtype``."""
    if arch == "toy":
        from attnmod.loading import load_pipeline

        pipe = load_pipeline(None, device="cpu", dtype=torch.float32)
        ids = pipe.tokenizer("a large red circle in the center, on a plain white background, flat style",
                             padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
        with torch.inference_mode():
            context = pipe.text_encoder(ids.input_ids)[0]
        unet, extra = pipe.unet, {}
        side = side or unet.config.sample_size * pipe.vae_scale_factor
    else:
        config = json.loads((CONFIGS / f"{arch}_unet.json").read_text())
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # SDXL's 2.6 B parameters built directly in bf16: half the memory
        try:
            unet = UNet2DConditionModel.from_config(config).eval()
        finally:
            torch.set_default_dtype(default)
        g = torch.Generator().manual_seed(1)
        context = torch.randn(1, 77, config["cross_attention_dim"], generator=g)
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, generator=g),
                                           "time_ids": torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float)}}
    latent = side // 8
    sample = torch.randn(1, unet.config.in_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    return unet.to(dtype), {"sample": sample, "encoder_hidden_states": context, **extra}, side


def batch_inputs(inputs: dict, rows: int, dtype) -> dict:
    def expand(v):
        if isinstance(v, dict):
            return {k: expand(x) for k, x in v.items()}
        return v.expand(rows, *v.shape[1:]).to(dtype) if isinstance(v, torch.Tensor) else v
    return {k: expand(v) for k, v in inputs.items()}


class Maxima:
    """Per-row largest |value| over every leaf module's floating inputs and outputs (and non-finite flags)."""

    def __init__(self, unet, rows: int):
        self.rows = rows
        self.any = torch.zeros(rows)
        self.handles = [m.register_forward_hook(self.hook) for m in unet.modules() if not list(m.children())]

    def _see(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 1 and x.shape[0] == self.rows:
            a = x.detach().abs().float().reshape(self.rows, -1).amax(1)
            self.any = torch.maximum(self.any, torch.nan_to_num(a, nan=float("inf")))

    def hook(self, module, args, output):
        for x in args:
            self._see(x)
        self._see(output)

    def remove(self):
        for h in self.handles:
            h.remove()


def block_outputs(unet, pairs, rows: int):
    """Each row's own block's largest |``to_out`` input| (the scaled product m * attention) and |output|
    (row i scales block ``pairs[i][0]``): tensors (2, rows) filled as the UNet runs."""
    out = torch.zeros(2, rows)
    handles = []
    for name in {n for n, _ in pairs}:
        idx = torch.tensor([i for i, (n, _) in enumerate(pairs) if n == name])

        def hook(module, args, output, idx=idx):
            for k, x in enumerate((args[0], output)):
                a = x.detach().abs().float().reshape(x.shape[0], -1)[idx].amax(1)
                out[k, idx] = torch.maximum(out[k, idx], torch.nan_to_num(a, nan=float("inf")))
        handles.append(unet.get_submodule(name).to_out[0].register_forward_hook(hook))
    return out, handles


def run_rows(unet, inputs, pairs, multipliers, dtype, chunk: int):
    """(largest |activation| anywhere, largest |block output|, UNet output finite) per row."""
    anys, blocks, finite = [], [], []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        mult = multipliers[start : start + chunk]
        rows = len(part)
        mods = [{name: Schedule(start=float(m))} for (name, _), m in zip(part, mult, strict=True)]
        maxima = Maxima(unet, rows)
        bout, handles = block_outputs(unet, part, rows)
        try:
            with fp32_fallback(False), AttnMod(unet, mods, auto_step=False) as ctl, torch.inference_mode():
                ctl.start_loop(1)
                ctl.set_step(0, rows)
                y = unet(timestep=torch.tensor(999), **batch_inputs(inputs, rows, dtype)).sample
        finally:
            maxima.remove()
            for h in handles:
                h.remove()
        anys.append(maxima.any)
        blocks.append(bout)
        finite.append(torch.isfinite(y.float()).reshape(rows, -1).all(1))
    return torch.cat(anys), torch.cat(blocks, dim=1), torch.cat(finite)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("toy", "sd15", "sdxl"), default="toy")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of the threshold search")
    ap.add_argument("--side", type=int, default=0, help="image side in pixels (default 64)")
    ap.add_argument("--iterations", type=int, default=5, help="Newton steps of the search")
    ap.add_argument("--chunk", type=int, default=64, help="rows per UNet call")
    ap.add_argument("--check", type=int, default=8, help="fp16 checks of the N lowest (block, sign) pairs; -1: all")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    unet, inputs, side = build(args.arch, dtype, args.side or 64)
    blocks = [b for b in list_blocks(unet)]
    pairs = [(b.name, s) for b in blocks for s in (1, -1)]
    short = {b.name: b.short for b in blocks}
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"# fp16 overflow thresholds: {args.arch}, {side}x{side}, {len(blocks)} blocks, search in {args.dtype}; "
          f"{machine}", flush=True)

    base_any, _, _ = run_rows(unet, inputs, [pairs[0]], [1.0], dtype, 1)
    print(f"  stock (multiplier 1): largest |activation| {base_any[0]:.1f}", flush=True)
    m = torch.tensor([64.0 * s for _, s in pairs])
    for it in range(args.iterations):
        anys, bouts, _ = run_rows(unet, inputs, pairs, m.tolist(), dtype, args.chunk)
        ratio = FP16_MAX / anys
        print(f"  step {it}: |m| median {m.abs().median():.1f}, max |activation| / 65504 in "
              f"[{(1 / ratio).min():.3f}, {(1 / ratio).max():.3f}]  ({time.perf_counter() - t0:.0f} s)", flush=True)
        if it == args.iterations - 1 or ((ratio - 1).abs() < 0.01).all():
            break
        # the block's own output is linear in m and one of the activations: its 65504-crossing bounds the answer
        # from above; below it, a Newton step on the (nearly linear) largest activation
        upper = m.abs() * FP16_MAX / bouts[1]
        m = torch.sign(m) * torch.minimum(m.abs() * ratio.clamp(min=1 / 16), upper).clamp(max=1e7)
    product_thr, block_thr = (m.abs() * FP16_MAX / bouts).tolist()  # both linear in m
    residual = (anys / FP16_MAX).tolist()
    rows = [{"block": short[n], "name": n, "sign": s, "threshold": abs(float(mi)), "at_threshold_max_over_65504": r,
             "product_threshold": pt, "block_output_threshold": bt}
            for (n, s), mi, r, pt, bt in zip(pairs, m.tolist(), residual, product_thr, block_thr, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: rows[i]["threshold"])

    n_check = len(rows) if args.check < 0 else min(args.check, len(rows))
    if n_check:
        unet16 = unet.to(torch.float16)
        chosen = [order[i] for i in range(n_check)]
        check_pairs = [pairs[i] for i in chosen] * 2
        # a multiplier above 65504 is inf in the fp16 table itself: below, check the largest finite one instead
        mults = [min(0.9 * rows[i]["threshold"], FP16_MAX) * rows[i]["sign"] for i in chosen] + \
                [1.1 * rows[i]["threshold"] * rows[i]["sign"] for i in chosen]
        _, bouts16, finite16 = run_rows(unet16, inputs, check_pairs, mults, torch.float16, args.chunk)
        for k, i in enumerate(chosen):
            rows[i]["fp16_finite_at_0.9"] = bool(finite16[k])
            rows[i]["fp16_finite_at_1.1"] = bool(finite16[k + n_check])
            rows[i]["fp16_block_output_finite_at_1.1"] = bool(torch.isfinite(bouts16[1, k + n_check]))
        print(f"  fp16 check of the {n_check} lowest: finite at 0.9x threshold "
              f"{sum(rows[i]['fp16_finite_at_0.9'] for i in chosen)}/{n_check}, non-finite at 1.1x "
              f"{sum(not rows[i]['fp16_finite_at_1.1'] for i in chosen)}/{n_check}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\n  {'block':<10} {'sign':>4} {'threshold':>10} {'m*attention':>12} {'own output':>11} "
          f"{'fp16 0.9x / 1.1x':>17}   (multipliers where each passes 65504; 0.9x: at most 65504)")
    for i in order[: max(12, n_check)]:
        r = rows[i]
        check = (f"{'finite' if r['fp16_finite_at_0.9'] else 'NaN/inf'} / "
                 f"{'finite' if r['fp16_finite_at_1.1'] else 'NaN/inf'}") if "fp16_finite_at_0.9" in r else ""
        print(f"  {r['block']:<10} {'+' if r['sign'] > 0 else '-':>4} {r['threshold']:10.1f} "
              f"{r['product_threshold']:12.1f} {r['block_output_threshold']:11.1f} {check:>17}")
    for kind in ("A1", "A2"):
        for sign in (1, -1):
            sel = [r for r in rows if r["block"].endswith(kind) and r["sign"] == sign]
            low = min(sel, key=lambda r: r["threshold"])
            print(f"  {kind} ({'self' if kind == 'A1' else 'cross'}-attention), {'+' if sign > 0 else '-'}: lowest "
                  f"{low['threshold']:.1f} at {low['block']}, median {sorted(r['threshold'] for r in sel)[len(sel) // 2]:.1f}"
                  f", below 50: {sum(r['threshold'] < 50 for r in sel)}/{len(sel)}, below 20: "
                  f"{sum(r['threshold'] < 20 for r in sel)}/{len(sel)}")
    first = sum(abs(r["product_threshold"] / r["threshold"] - 1) < 0.02 for r in rows)
    print(f"  the threshold is where the scaled product m*attention (to_out's input) passes 65504 for {first}/{len(rows)}"
          f" (block, sign) pairs; for the others a value downstream (the residual stream, later layers) passes first")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "side": side, "search_dtype": args.dtype,
                                               "machine": machine, "stock_max": float(base_any[0]), "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
