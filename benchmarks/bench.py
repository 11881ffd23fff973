"""attnmod benchmarks: ratios measured side by side in one run (not timed tests).

    python benchmarks/bench.py --quick            # < 2 min on 2 CPU cores (CI runs this)
    python benchmarks/bench.py                    # the figures in docs/benchmarks.md
    python benchmarks/bench.py --device cuda      # on a GPU
    python benchmarks/bench.py --only 6           # some sections only (comma-separated numbers)

1. hook overhead: stock pipeline vs AttnMod installed at neutral settings on every block, one block
   modified, and every block modified — on a UNet with the full SD1.5 architecture and random weights
   (same compute as the real model, from attnmod/configs/sd15_unet.json; small text encoder and VAE),
   and on the embedded model. Conditions are interleaved round by round; medians are reported.
2. scan throughput: an attention scan done the naive way (one pipeline call per tile, processors
   re-installed every step as in the authors' reference code) vs attnmod's batched scan.
3. greedy strategy: candidates in one batched UNet call per step vs one UNet call per candidate.
4. memory: peak working memory (above the loaded model) of plain generation vs generation under
   AttnMod (every block modified) vs attention-map capture on every block vs StyleAligned sharing, each
   in a fresh process at a resolution where activations matter (CPU: resident set size with the peak
   counter reset after loading; CUDA: peak allocated).
5. Cross-Image Attention: UNet calls, image evaluations (batch rows) and seconds of one transfer (both
   inversions included) against one plain generation on the embedded model, and its peak working memory
   against 4 plain images, at the model's own size.
6. Bounded Attention: seconds per image of plain generation, layout guidance and bounded attention (the
   reference's 50 steps, 15 guided) on the embedded model at its own size, and the peak working memory of one
   image (4 steps, 2 guided) with the masks as biases of the fused kernel vs every layer's probabilities built
   (the reference's way, ``explicit_everywhere``), at the model's size and at 256x256.
7. DiT hook overhead: stock vs AttnMod (all streams neutral, one stream modified, all modified) on the full
   SD3-medium (24 joint blocks) and FLUX.1-dev (19 double + 38 single blocks) transformer architectures from
   attnmod/configs, random weights: meta-initialised to check the architecture, then materialised with every
   block of a kind sharing one block's weights (the same compute, modules, hooks and names; FLUX's 12 B
   parameters would not fit a small machine's memory otherwise). Tiny text encoders and VAE of the right widths,
   latents only. --quick shrinks them to 2 blocks of each kind at 64x64 (same code path).
8. torch.compile: eager vs compiled UNet (``load_pipeline(..., compile="default")``, inductor) on the embedded
   model, seconds per image of plain generation and of AttnMod (every block modified), side by side and
   interleaved; the compile warm-up of each; the number of compiled graphs after the warm-up and after the timed
   rounds (equal: no recompilation per step or setting). Skipped by --quick (inductor's warm-up alone takes
   minutes on a small CPU); run it with --only 8.
9. precision x compile: on the embedded model, for fp32, bf16 and fp16 (fp16 runs on CPU, through slow fallback
   kernels: eager only there), eager vs compiled seconds per image of plain generation and of one scan batch (8
   images, batched CFG), each stock and with AttnMod (every block modified in generation; 8 different settings of
   U1A1A2 in the batch), hook overhead (AttnMod over stock) in each — side by side, interleaved; then peak GPU memory of
   plain generation with and without ``offload="model"`` (CUDA only: "no GPU" otherwise). ``--quick``: eager rows
   only, 4 steps, 1 round, and on CPU no fp16. Full run: 10 steps, 3 interleaved rounds (fp16 on CPU: 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import copy  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

import attnmod  # noqa: E402
from attnmod import Recipe, Schedule, Sweep, run_scan  # noqa: E402
from attnmod.blocks import list_blocks  # noqa: E402
from attnmod.loading import EMBEDDED_MODEL, load_pipeline  # noqa: E402
from attnmod.strategy import run_strategy  # noqa: E402
from attnmod.tiny import _scheduler, _text_encoder, _tokenizer, _vae  # noqa: E402

CONFIG = Path(attnmod.__file__).parent / "configs" / "sd15_unet.json"


def sd15_architecture(device, dtype) -> StableDiffusionPipeline:
    """The full SD1.5 UNet (859 M parameters, random weights) with a small text encoder and VAE."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads(CONFIG.read_text())).eval()
    tokenizer = _tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, 768), tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)


def shared_weight_transformer(config: str, depth: int | None = None):
    """A DiT transformer with the architecture of ``attnmod/configs/<config>``: every joint (single) block is a
    distinct module sharing the first joint (single) block's random weights. ``depth`` caps the blocks of each
    kind (--quick). Returns (transformer, the meta-initialised full model, for its block list and size)."""
    cfg = json.loads((CONFIG.parent / config).read_text())
    cls = getattr(diffusers, cfg["_class_name"])
    with torch.device("meta"):
        full = cls.from_config(cfg)
    flux = "num_single_layers" in cfg
    layers = min(cfg["num_layers"], depth or cfg["num_layers"])
    singles = min(cfg.get("num_single_layers", 0), depth or cfg.get("num_single_layers", 0))
    torch.manual_seed(0)
    net = cls.from_config({**cfg, "num_layers": 1 if flux else 2, **({"num_single_layers": 1} if flux else {})})

    def copies(block, n):  # new modules (own hooks), the same Parameter objects
        return [copy.deepcopy(block, memo={id(p): p for p in block.parameters()}) for _ in range(n)]

    first = net.transformer_blocks[0]
    tail = [] if flux else [net.transformer_blocks[1]]  # SD3's last block has no text output: keep it last
    net.transformer_blocks = torch.nn.ModuleList([first, *copies(first, layers - 1 - len(tail)), *tail])
    if flux:
        net.single_transformer_blocks = torch.nn.ModuleList(
            [net.single_transformer_blocks[0], *copies(net.single_transformer_blocks[0], singles - 1)])
    net.register_to_config(num_layers=layers, **({"num_single_layers": singles} if flux else {}))
    return net.eval(), full


def dit_architecture(config: str, device, dtype, depth: int | None = None):
    """A stock SD3 / FLUX pipeline around ``shared_weight_transformer``: tiny CLIP/T5 encoders of the right
    widths (SD3 without T5: its part is zeros), a tiny VAE with the 8x downsampling. (pipe, full meta model)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from attnmod.dit.tiny import t5_tokenizer

    net, full = shared_weight_transformer(config, depth)
    tok = _tokenizer()

    def clip(hidden, projection):
        conf = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                              projection_dim=hidden, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(conf).eval()

    vae = AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8,
                        layers_per_block=1).eval()
    if "num_single_layers" in net.config:
        t5tok = t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=net.config.joint_attention_dim, d_kv=32, d_ff=64,
                                     num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1)).eval()
        pipe = FluxPipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                            text_encoder=clip(768, False), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5tok)
    else:
        pipe = StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                        text_encoder=clip(768, True), tokenizer=tok, text_encoder_2=clip(1280, True),
                                        tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return (pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)), full


def dit_overhead(pipe, recipe: Recipe, rounds: int, device) -> list[tuple[str, float, float]]:
    """Stock vs AttnMod on every stream neutral, the middle joint block's image stream, every stream modified."""
    names = [b.name for b in list_blocks(pipe)]
    one = f"J{len(pipe.transformer.transformer_blocks) // 2}I"
    extra = {"max_sequence_length": 32} if isinstance(pipe, diffusers.FluxPipeline) else {}

    def call(mods=None):
        def fn():
            with attnmod.modify(pipe, mods) if mods is not None else contextlib.nullcontext(), torch.inference_mode():
                pipe(recipe.prompt, num_inference_steps=recipe.steps, guidance_scale=recipe.guidance,
                     width=recipe.width, height=recipe.height, generator=torch.Generator("cpu").manual_seed(0),
                     output_type="latent", **extra)
        return fn

    conditions = {
        "stock diffusers": call(),
        "AttnMod, all streams neutral": call({n: Schedule() for n in names}),
        f"AttnMod, {one} modified": call({one: Schedule(-5, 0.2)}),
        f"AttnMod, all {len(names)} streams modified": call({n: Schedule(-5, 0.2) for n in names}),
    }
    med = interleaved(conditions, rounds, device)
    return [(name, t, t / med["stock diffusers"]) for name, t in med.items()]


def timed(fn, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(conditions: dict, rounds: int, device) -> dict[str, float]:
    """Median seconds per condition; one warm-up each, then the conditions alternate every round."""
    for fn in conditions.values():
        fn()
    times = {name: [] for name in conditions}
    for _ in range(rounds):
        for name, fn in conditions.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def overhead(pipe, recipe: Recipe, rounds: int, device) -> list[tuple[str, float, float]]:
    names = [b.name for b in list_blocks(pipe.unet)]

    def call(mods=None):
        def fn():
            if mods is None:
                render_stock(pipe, recipe)
            else:
                with attnmod.modify(pipe, mods):
                    render_stock(pipe, recipe)
        return fn

    conditions = {
        "stock diffusers": call(),
        "AttnMod, all blocks neutral": call({n: Schedule() for n in names}),
        "AttnMod, U1A1A2 modified": call({"U1A1A2": Schedule(-5, 0.2)}),
        f"AttnMod, all {len(names)} blocks modified": call({n: Schedule(-5, 0.2) for n in names}),
    }
    med = interleaved(conditions, rounds, device)
    base = med["stock diffusers"]
    return [(name, t, t / base) for name, t in med.items()]


def render_stock(pipe, recipe: Recipe):
    with torch.inference_mode():
        pipe(recipe.prompt, num_inference_steps=recipe.steps, guidance_scale=recipe.guidance,
             width=recipe.width, height=recipe.height, generator=torch.Generator("cpu").manual_seed(0),
             output_type="latent")


def naive_scan(pipe, recipes: list[Recipe]) -> None:
    """The reference way: one pipeline call per tile, processors re-installed at every step."""
    for r in recipes:
        def reinstall(p, i, t, kw):
            processors = dict(p.unet.attn_processors)  # set_attn_processor empties its argument: copy
            p.unet.set_attn_processor(processors)
            return kw

        with attnmod.modify(pipe, r.mods_dict), torch.inference_mode():
            pipe(r.prompt, num_inference_steps=r.steps, guidance_scale=r.guidance, width=r.width, height=r.height,
                 generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np",
                 callback_on_step_end=reinstall)


def scan_throughput(pipe, base: Recipe, starts: int, rates: int, batch: int, device):
    sweep = Sweep(prompts=(base.prompt,), starts=tuple(range(-20, -20 + 10 * starts, 10))[:starts],
                  rates=tuple(round(-1 + 2 * i / max(1, rates - 1), 3) for i in range(rates)))
    from attnmod.sweep import plan

    recipes = list({t.recipe.key: t.recipe for t in plan(pipe, sweep, base)}.values())
    naive = timed(lambda: naive_scan(pipe, recipes), device)
    batched = timed(lambda: run_scan(pipe, sweep, base, batch_size=batch, progress=False), device)
    n = len(recipes)
    return n, 60 * n / naive, 60 * n / batched


def transfer_cost(pipe, recipe: Recipe, device, quick: bool) -> dict:
    """UNet calls, image rows and seconds: one transfer (inversions included) vs one plain generation."""
    from dataclasses import replace

    from attnmod.generate import render
    from attnmod.methods.transfer import TransferOptions, transfer
    from attnmod.recipe import to_pil

    inputs = [to_pil(x) for x in render(pipe, [recipe, replace(recipe, seed=1)])]
    options = TransferOptions(prompt="", adain="plain", **({"steps": 20, "skip": 6} if quick else {}))
    counts = {}

    def measure(name, fn):
        calls = {"calls": 0, "rows": 0}

        def count(module, args, kwargs):
            calls["calls"] += 1
            calls["rows"] += (args[0] if args else kwargs["sample"]).shape[0]

        handle = pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
        try:
            calls["seconds"] = timed(fn, device)
        finally:
            handle.remove()
        counts[name] = calls

    measure("plain", lambda: render_stock(pipe, recipe))
    measure("transfer", lambda: transfer(pipe, inputs[0], inputs[1], options))
    counts["steps"] = {"plain": recipe.steps, "transfer": f"{options.steps} (last {options.steps - options.skip} run)"}
    return counts


def layout_cost(pipe, recipe: Recipe, device, quick: bool) -> dict:
    """Seconds of one image: plain, layout guidance, bounded attention (two subjects, the reference's settings)."""
    from attnmod.methods.bounded import LAYOUT_GUIDANCE, BoundedOptions, Subject, bounded

    subjects = [Subject("red circle", (0.05, 0.2, 0.45, 0.8)), Subject("white background", (0.55, 0.2, 0.95, 0.8))]
    steps = 20 if quick else 50
    runs = {"plain": ([], BoundedOptions()), "layout guidance": (subjects, LAYOUT_GUIDANCE),
            "bounded attention": (subjects, BoundedOptions())}
    seconds = {name: timed(lambda s=s, o=o: bounded(pipe, recipe.prompt, s, o, steps=steps, guidance=3.0), device)
               for name, (s, o) in runs.items()}
    return {"steps": steps, "seconds": seconds}


def strategy_cost(pipe, base: Recipe, blocks: str, device):
    batched = timed(lambda: run_strategy(pipe, base, blocks=blocks), device)
    slow = timed(lambda: run_strategy(pipe, base, blocks=blocks, candidate_batch=1), device)
    return batched, slow


MEMORY_CHILD = """
import gc, os, sys, warnings, torch
warnings.filterwarnings("ignore")
from attnmod import Recipe, Schedule, load_pipeline
from attnmod.generate import render
model, device, condition, side = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dtype = torch.float16 if device.startswith("cuda") else torch.float32
pipe = load_pipeline(model, device=device, dtype=dtype)
recipe = Recipe("a large red circle in the center, on a plain white background, flat style", steps=4,
                width=side, height=side, guidance=3.0)
if condition == "attnmod":
    recipe = recipe.with_mods({k.removesuffix(".processor"): Schedule(-5, 0.2) for k in pipe.unet.attn_processors})

def status(field):  # kB -> bytes, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

if condition == "transfer":
    from attnmod.recipe import to_pil
    from attnmod.methods.transfer import TransferOptions, transfer
    inputs = [to_pil(x) for x in render(pipe, [recipe, Recipe(recipe.prompt, seed=1, steps=4, width=side,
                                                               height=side, guidance=3.0)])]

gc.collect()
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one
    base = status("VmRSS")
if condition == "maps":
    from attnmod.maps import trace
    with trace(pipe, blocks="all") as tc:
        render(pipe, [recipe] * 4)
    tc.result(recipe.prompt)
elif condition == "style":
    from attnmod.methods.style_aligned import style_aligned
    with style_aligned(pipe, images=4):
        render(pipe, [recipe] * 4)
elif condition.startswith("layout"):
    from attnmod.methods.bounded import BoundedOptions, Subject, bounded
    kind = condition.split("-", 1)[1]
    o = BoundedOptions(guidance_steps=2, iterations=2, masks=kind != "guidance", self_loss=0.0 if kind == "guidance"
                       else 0.5, explicit_everywhere=kind == "explicit")
    subjects = [] if kind == "plain" else [Subject("red circle", (0.05, 0.2, 0.45, 0.8)),
                                           Subject("white background", (0.55, 0.2, 0.95, 0.8))]
    bounded(pipe, recipe.prompt, subjects, o, steps=4, guidance=3.0, height=side, width=side)
elif condition == "transfer":  # the inputs were made before the peak counter was reset
    transfer(pipe, inputs[0], inputs[1], TransferOptions(prompt="", steps=10, skip=3, windows=((1, 10), (1, 10)),
                                                         adain="plain"))
else:
    render(pipe, [recipe] * 4)
if device.startswith("cuda"):
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    peak = status("VmHWM")
print(base, peak)
"""


def peak_memory(model: str, device: str, condition: str, side: int) -> tuple[int, int]:
    """(memory before generating, peak while generating 4 images) in a fresh process, in bytes.

    CPU: resident set size, with the peak counter reset after loading (``/proc/self/clear_refs``) and
    glibc told to return large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``), so the peak
    is the generation's own working memory. CUDA: ``torch.cuda`` allocated bytes.
    """
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, model, device, condition, str(side)], check=True,
                         capture_output=True, text=True, env=env)
    base, peak = out.stdout.strip().splitlines()[-1].split()
    return int(base), int(peak)


def compile_cost(model: str, device, dtype, steps: int, rounds: int) -> dict:
    """Section 8: eager vs compiled UNet, plain generation and AttnMod, seconds per image (medians)."""
    from torch._dynamo.utils import counters

    eager = load_pipeline(model, device=device, dtype=dtype)
    compiled = load_pipeline(model, device=device, dtype=dtype, compile="default")
    side = eager.unet.config.sample_size * eager.vae_scale_factor
    recipe = Recipe("a large red circle in the center, on a plain white background, flat style"
                    if model == "toy" else "a red cat", steps=steps, width=side, height=side, guidance=3.0)
    mods = {b.name: Schedule(-5, 0.2) for b in list_blocks(eager.unet)}

    def plain(pipe):
        return lambda: render_stock(pipe, recipe)

    def attnmod_run(pipe):
        def fn():
            with attnmod.modify(pipe, mods):
                render_stock(pipe, recipe)
        return fn

    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    before = graphs()
    warm = {"plain": timed(plain(compiled), device)}
    warm["attnmod"] = timed(attnmod_run(compiled), device)
    warm_graphs = graphs() - before
    med = interleaved({"eager plain": plain(eager), "compiled plain": plain(compiled),
                       "eager AttnMod": attnmod_run(eager), "compiled AttnMod": attnmod_run(compiled)},
                      rounds, device)
    return {"side": side, "steps": steps, "blocks": len(mods), "warmup_s": warm, "seconds": med,
            "graphs_after_warmup": warm_graphs, "graphs_after_rounds": graphs() - before}


def precision_cost(model: str, device, dtypes, steps: int, rounds: int, compiled: bool) -> dict:
    """Section 9: seconds per image, eager (and compiled) x stock / AttnMod x generation / scan batch, per dtype."""
    from attnmod.generate import render

    out = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        pipes = {"eager": load_pipeline(model, device=device, dtype=dtype)}
        if compiled and not (dtype == torch.float16 and device == "cpu"):
            pipes["compiled"] = load_pipeline(model, device=device, dtype=dtype, compile="default")
        side = pipes["eager"].unet.config.sample_size * pipes["eager"].vae_scale_factor
        prompt = ("a large red circle in the center, on a plain white background, flat style" if model == "toy"
                  else "a red cat")
        recipe = Recipe(prompt, steps=steps, width=side, height=side, guidance=3.0, model=model)
        every = {b.name: Schedule(-5, 0.2) for b in list_blocks(pipes["eager"].unet)}
        batch_stock = [recipe] * 8
        batch_mod = [recipe.with_mods({"U1A1A2": Schedule(s, 0.1)}) for s in (-20, -10, -5, 2, 5, 10, 20, 40)]

        def job(pipe, recipes):
            return lambda: render(pipe, recipes)

        conditions, warm = {}, {}
        for kind, pipe in pipes.items():
            conditions[f"{kind} generation stock"] = job(pipe, [recipe])
            conditions[f"{kind} generation AttnMod"] = job(pipe, [recipe.with_mods(every)])
            conditions[f"{kind} scan batch stock"] = job(pipe, batch_stock)
            conditions[f"{kind} scan batch AttnMod"] = job(pipe, batch_mod)
            if kind == "compiled":  # the warm-up of each compiled condition (batch sizes 2 and 16 compile once each)
                warm = {c: timed(conditions[c], device) for c in conditions if c.startswith("compiled")}
        med = interleaved(conditions, 1 if dtype == torch.float16 and device == "cpu" else rounds, device)
        per_image = {c: t / (8 if "scan batch" in c else 1) for c, t in med.items()}
        out[name] = {"side": side, "steps": steps, "seconds_per_image": per_image, "compile_warmup_s": warm}
        del pipes
    return out


def offload_memory(model: str, device) -> dict | str:
    """Peak GPU memory of one plain generation with and without ``offload="model"`` (CUDA only)."""
    if not device.startswith("cuda"):
        return "no GPU"
    from attnmod.generate import render

    peaks = {}
    for offload in (None, "model"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        pipe = load_pipeline(model, device=device, dtype=torch.float16, offload=offload)
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        render(pipe, [Recipe("a red cat", steps=4, width=side, height=side, guidance=3.0, model=model)])
        torch.cuda.synchronize()
        peaks[offload or "none"] = torch.cuda.max_memory_allocated()
        del pipe
    return peaks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes; < 2 min on 2 CPU cores")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--dit-side", type=int, help="section 7's image side (default: 64 with --quick, 128 on CPU)")
    ap.add_argument("--dit-rounds", type=int, help="section 7's timed rounds after the warm-up (default 2)")
    ap.add_argument("--only", help="run only these sections, e.g. 6 or 1,4 (default: all)")
    args = ap.parse_args(argv)
    try:
        only = {int(n) for n in args.only.split(",")} if args.only else set(range(1, 10)) - ({8} if args.quick else set())
    except ValueError:
        ap.error(f"--only takes section numbers 1-9 separated by commas, got {args.only!r}")
    device = args.device
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    quick = args.quick
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
               f"{torch.__version__}, threads {torch.get_num_threads()}", "device": device, "quick": quick}
    if device.startswith("cuda"):
        results["machine"] += f", {torch.cuda.get_device_name()}"
    print(f"# attnmod benchmark on {results['machine']} ({device}){' --quick' if quick else ''}")

    models = []
    if 1 in only and (not quick or device != "cpu"):
        # on CPU 64x64 (8x8 latents) and 4 steps: at 128x128 and 8 steps this section alone took > 17 min
        size = 512 if device.startswith("cuda") else 64
        models.append((f"SD1.5 architecture, random weights, {size}x{size}", sd15_architecture(device, dtype),
                       Recipe("a photo of a cat", steps=4 if quick or device == "cpu" else 8, width=size,
                              height=size)))
    if only == {7}:
        return dit_section(results, device, dtype, quick, args)
    toy = "toy" if EMBEDDED_MODEL.joinpath("model_index.json").exists() else "tiny"
    toy_pipe = load_pipeline(toy, device=device, dtype=dtype)
    side = toy_pipe.unet.config.sample_size * toy_pipe.vae_scale_factor
    toy_recipe = Recipe("a large red circle in the center, on a plain white background, flat style"
                        if toy == "toy" else "a red cat", steps=20, width=side, height=side, guidance=3.0)
    models.append((f"embedded model '{toy}', {side}x{side}", toy_pipe, toy_recipe))

    if 1 in only:
        print("\n## 1. hook overhead (median per generation; ratio to stock)")
        results["overhead"] = {}
    for label, pipe, recipe in models if 1 in only else []:
        rows = overhead(pipe, recipe, rounds=3 if quick else 5, device=device)
        results["overhead"][label] = rows
        print(f"\n{label}, {recipe.steps} steps, CFG {recipe.guidance}")
        for name, t, ratio in rows:
            print(f"  {name:<34} {t * 1000:9.1f} ms   x{ratio:.3f}")

    if 2 in only:
        print("\n## 2. scan throughput (images per minute)")
        starts, rates = (5, 3) if quick else (15, 9)
        batch = 8 if device == "cpu" else 32
        n, naive, batched = scan_throughput(toy_pipe, toy_recipe, starts, rates, batch, device)
        results["scan"] = {"tiles": n, "naive_per_min": naive, "batched_per_min": batched, "batch": batch}
        print(f"  {starts}x{rates} scan on '{toy}' ({n} distinct images, {toy_recipe.steps} steps)")
        print(f"  naive, one call per tile, processors re-installed per step: {naive:8.1f} img/min")
        print(f"  attnmod batched scan (batch {batch}):{'':23}{batched:8.1f} img/min   x{batched / naive:.2f}")

    if 3 in only:
        print("\n## 3. greedy strategy: batched candidates vs one UNet call per candidate")
        blocks = "U*" if quick else "all"
        strat_recipe = Recipe(toy_recipe.prompt, steps=8 if quick else 20, width=side, height=side, guidance=3.0)
        batched_s, slow_s = strategy_cost(toy_pipe, strat_recipe, blocks, device)
        results["strategy"] = {"blocks": blocks, "batched_s": batched_s, "per_candidate_s": slow_s}
        print(f"  '{toy}', blocks {blocks}, {strat_recipe.steps} steps: batched {batched_s:.2f} s, "
              f"per-candidate {slow_s:.2f} s   x{slow_s / batched_s:.2f} faster")

    what = "peak allocated" if device.startswith("cuda") else "peak RSS"
    if 4 in only:
        mem_side = 128 if quick else 256
        print(f"\n## 4. memory while generating 4 images at {mem_side}x{mem_side} on '{toy}', fresh process each")
        what = "peak allocated" if device.startswith("cuda") else "peak RSS"
        print(f"  {'condition':<34} {what + ' above loaded model':>28}   ratio   {what} in all")
        results["memory"] = {"side": mem_side}
        plain = None
        for condition, label in (("plain", "plain generation"), ("attnmod", "AttnMod, every block modified"),
                                 ("maps", "attention maps, every block"), ("style", "StyleAligned sharing")):
            base, peak = peak_memory(toy, device, condition, mem_side)
            work = peak - base
            plain = work if plain is None else plain
            results["memory"][label] = {"before": base, "peak": peak}
            print(f"  {label:<34} {work / 2**20:22.1f} MiB   x{work / plain:5.2f}   {peak / 2**20:8.1f} MiB")

    if 5 in only:
        print(f"\n## 5. Cross-Image Attention on '{toy}' at {side}x{side}: one transfer (both DDPM inversions included) "
              "vs one plain generation")
        cost = transfer_cost(toy_pipe, toy_recipe, device, quick)
        results["transfer"] = cost
        plain_cost = cost["plain"]
        for name in ("plain", "transfer"):
            c = cost[name]
            print(f"  {name:<10} steps {cost['steps'][name]:<16} UNet calls {c['calls']:4d}   image evaluations "
                  f"{c['rows']:5d}   {c['seconds']:7.2f} s   x{c['seconds'] / plain_cost['seconds']:.1f}")
        # memory at the model's own size (the inversions take images of that size): 4 plain images vs one transfer
        plain_mem = peak_memory(toy, device, "plain", side)
        transfer_mem = peak_memory(toy, device, "transfer", side)
        cost["memory"] = {"side": side, "plain": plain_mem, "transfer": transfer_mem}
        work = [peak - base for base, peak in (plain_mem, transfer_mem)]
        print(f"  {what} above the loaded model at {side}x{side}: 4 plain images {work[0] / 2**20:.1f} MiB, one transfer "
              f"(10 steps, 6 rows per UNet call) {work[1] / 2**20:.1f} MiB   x{work[1] / max(work[0], 1):.2f}")

    if 6 in only:
        results["layout"] = layout_cost(toy_pipe, toy_recipe, device, quick)
        print(f"\n## 6. Bounded Attention on '{toy}' at {side}x{side}: seconds per image "
              f"({results['layout']['steps']} steps, 15 guided)")
        plain_s = results["layout"]["seconds"]["plain"]
        for name, sec in results["layout"]["seconds"].items():
            print(f"  {name:<34} {sec:7.2f} s   x{sec / plain_s:.1f}")
        print(f"  {what} above the loaded model, one image, 4 steps (2 guided, 2 iterations), fresh process each:")
        results["layout"]["memory"] = {}
        for mside in (side,) if quick else (side, 256):
            row = {}
            for condition, label in (("layout-plain", "plain"), ("layout-guidance", "layout guidance"),
                                     ("layout-bounded", "bounded, masks as SDPA biases"),
                                     ("layout-explicit", "bounded, every layer explicit")):
                base, peak = peak_memory(toy, device, condition, mside)
                row[label] = {"before": base, "peak": peak}
            results["layout"]["memory"][mside] = row
            plain_w = max(1, row["plain"]["peak"] - row["plain"]["before"])
            for label, m in row.items():
                work = m["peak"] - m["before"]
                print(f"  {mside}x{mside} {label:<30} {work / 2**20:9.1f} MiB   x{work / plain_w:5.2f}")

    if 8 in only:
        steps = 4 if quick else 20
        cost = results["compile"] = compile_cost(toy, device, dtype, steps, rounds=2 if quick else 5)
        print(f"\n## 8. torch.compile (inductor, mode 'default') on '{toy}' at {cost['side']}x{cost['side']}, "
              f"{steps} steps, AttnMod on all {cost['blocks']} blocks: seconds per image")
        sec = cost["seconds"]
        for what in ("plain", "AttnMod"):
            e, c = sec[f"eager {what}"], sec[f"compiled {what}"]
            print(f"  {what:<8} eager {e:7.3f} s   compiled {c:7.3f} s   x{e / c:.2f} faster   "
                  f"(compiled warm-up {cost['warmup_s'][what.lower()]:.1f} s)")
        print(f"  AttnMod over plain: eager x{sec['eager AttnMod'] / sec['eager plain']:.3f}, compiled "
              f"x{sec['compiled AttnMod'] / sec['compiled plain']:.3f}; compiled graphs: "
              f"{cost['graphs_after_warmup']} after the warm-up, {cost['graphs_after_rounds']} after the timed rounds")
    elif quick and not args.only:
        print("\n## 8. torch.compile: skipped with --quick (inductor's warm-up takes minutes on CPU; --only 8)")

    if 9 in only:
        # fp16 on CPU runs through slow fallback kernels (x13-x21 fp32's time): not in --quick
        dtypes = (torch.float32, torch.bfloat16) + (() if quick and device == "cpu" else (torch.float16,))
        cost = results["precision"] = precision_cost(toy, device, dtypes, steps=4 if quick else 10,
                                                     rounds=1 if quick else 3, compiled=not quick)
        any_row = next(iter(cost.values()))
        print(f"\n## 9. precision x compile on '{toy}' at {any_row['side']}x{any_row['side']}, {any_row['steps']} steps, "
              f"seconds per image (scan batch: 8 images in one call){' - eager only with --quick' if quick else ''}")
        print(f"  {'dtype':<9} {'':<11} {'stock':>8} {'AttnMod':>8} {'overhead':>8}   {'compiled stock':>14} "
              f"{'AttnMod':>8} {'overhead':>8}   {'compile speed-up':>16}")
        ref = cost["float32"]["seconds_per_image"]
        for name, row in cost.items():
            sec = row["seconds_per_image"]
            for what in ("generation", "scan batch"):
                e, em = sec[f"eager {what} stock"], sec[f"eager {what} AttnMod"]
                line = f"  {name:<9} {what:<11} {e:8.3f} {em:8.3f}   x{em / e:.3f}"
                if f"compiled {what} stock" in sec:
                    c, cm = sec[f"compiled {what} stock"], sec[f"compiled {what} AttnMod"]
                    line += f"   {c:14.3f} {cm:8.3f}   x{cm / c:.3f}   x{e / c:.2f} / x{em / cm:.2f}"
                else:
                    line += f"   {'(not compiled)':>14}"
                print(line + f"   [eager stock vs fp32 x{e / ref[f'eager {what} stock']:.2f}]")
            if row["compile_warmup_s"]:
                print(f"  {name:<9} compile warm-ups: " + ", ".join(
                    f"{c.removeprefix('compiled ')} {t:.1f} s" for c, t in row["compile_warmup_s"].items()))
        mem = results["offload_memory"] = offload_memory(toy, device)
        if isinstance(mem, str):
            print(f"  peak memory with / without --offload model: {mem} (CUDA only)")
        else:
            print(f"  peak GPU memory, one image: no offload {mem['none'] / 2**20:.1f} MiB, offload model "
                  f"{mem['model'] / 2**20:.1f} MiB   x{mem['model'] / mem['none']:.2f}")

    if 7 in only:
        return dit_section(results, device, dtype, quick, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def dit_section(results: dict, device, dtype, quick: bool, args) -> int:
    side = args.dit_side or (64 if quick else (512 if device.startswith("cuda") else 128))
    steps = 1 if quick or device == "cpu" else 8
    print(f"\n## 7. DiT hook overhead (median per generation; ratio to stock), {side}x{side}, {steps} step(s)")
    results["dit_overhead"] = {}
    for label, config, guidance in (("SD3-medium", "sd3_medium_transformer.json", 7.0),
                                    ("FLUX.1-dev", "flux1_dev_transformer.json", 3.5)):
        pipe, full = dit_architecture(config, device, dtype, depth=2 if quick else None)
        blocks = list_blocks(pipe)
        if not quick:  # the shared-weight model has the full architecture's every block, in order
            assert [b.short for b in blocks] == [b.short for b in list_blocks(full)]
        params = sum(p.numel() for p in full.parameters()) / 1e9
        recipe = Recipe("a photo of a cat", steps=steps, guidance=guidance, width=side, height=side)
        rows = dit_overhead(pipe, recipe, rounds=args.dit_rounds or (1 if quick else 2), device=device)
        what = f"{label} architecture ({params:.1f} B parameters, {len(blocks)} streams" + (
            ", shrunk to 2 blocks of each kind)" if quick else ")")
        results["dit_overhead"][label] = {"architecture": what, "rows": rows}
        print(f"\n{what}, CFG {'batched' if label.startswith('SD3') else 'embedded'} {guidance}")
        for name, t, ratio in rows:
            print(f"  {name:<34} {t * 1000:9.1f} ms   x{ratio:.3f}")
        del pipe
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
