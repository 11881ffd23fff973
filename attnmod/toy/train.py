"""Train the toy model: the VAE first, then the UNet and text encoder jointly (v-prediction), then
the VAE decoder alone (encoder frozen, object pixels weighted up).

``train(cfg, workdir, export)`` is seeded and resumable: ``workdir/ckpt.pt`` holds the phase, step,
models, EMA, optimizer and RNG state, and calling ``train`` again with the same ``workdir``
continues where it stopped, bit-identically to an uninterrupted run (CPU; same thread count).
The UNet phase trains on a cache of VAE latents of ``cache_size`` generated images (built once,
saved in ``workdir``). Every ``export_every`` steps the EMA weights are written to ``export`` as a
complete diffusers folder, so there is always a usable model. Progress goes to a tqdm bar
(``progress=False`` silences it) and to ``callback(dict)``.

Fine-tuning (``finetune_config(folder)``, ``train-toy --finetune-from FOLDER``): no VAE or decoder
phase; the folder's VAE (frozen, its scaling factor), UNet and text encoder are the starting point, and
the UNet + text encoder phase continues with the final phase's losses (zero terminal SNR, caption
probe, token grounding) at a lower learning rate, on a latent cache that mixes anchored scenes
(``dataset.sample``, their caption variants, the place clause dropped with ``place_dropout``) and a
``layout_share`` of free-layout scenes (``dataset.sample_layout``). The cache holds every entry's
object masks (pooled to the latent grid) and probe labels, so grounding needs no re-rendering. Same
checkpoints, resume and exports as the full run.

Seeds: training images use seeds below ``EVAL_SEED0``; ``evaluate`` uses seeds from it upwards.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attnmod.attention import explicit_attention
from attnmod.toy import dataset
from attnmod.toy.grounding import (
    grounded_maps,
    grounding_targets,
    object_token_positions,
    pixel_loss,
    token_loss,
)
from attnmod.toy.model import SHIPPED, Components, ModelConfig, build, build_scheduler, save_pipeline
from attnmod.toy.probe import HEADS, IGNORE, CaptionProbe, labels_for_seeds, mask_dropped, scene_labels

EVAL_SEED0 = 10_000_000


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 4e-4  # cosine-decayed to 10 % over vae_steps
    kl_weight: float = 1e-6
    cache_size: int = 20_000
    steps: int = 21_500  # UNet + text encoder steps
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1  # empty prompt, for classifier-free guidance
    clause_dropout: float = 0.1  # drop the background clause / the style clause, each independently
    ema_decay: float = 0.999
    ckpt_every: int = 200
    export_every: int = 1000
    keep_every: int = 5000  # also keep ckpt-<step>.pt every this many steps (0: never)
    # UNet step from which the noise schedule is rescaled to zero terminal SNR (model.build_scheduler).
    # The shipped run trained its first 4,600 steps on SD's plain schedule and switched there after
    # measuring that positions followed the noise; 0 trains with zero terminal SNR throughout.
    zero_snr_from: int = 4600
    # UNet step from which the caption probe (toy.probe) adds ``aux_weight`` × its loss, so the text
    # encoder keeps every attribute readable. The shipped run added it at step 11,600 after measuring
    # that "left" and "right" had collapsed in the encoder's output; 0 uses it throughout.
    aux_from: int = 11_600
    aux_weight: float = 0.05
    # UNet step from which ``ground_weight`` × the token-grounding loss (toy.grounding) is added: the
    # size/colour/shape tokens' cross-attention at the latent resolution should fall on their object.
    # Added at step 20,000 after measuring that the shape word's maps often avoided the object.
    ground_from: int = 20_000
    ground_weight: float = 0.1
    # ... plus ``ground_pixel_weight`` × TokenCompose's pixel term (toy.grounding.pixel_loss): each
    # patch of the object should take much of its attention from those tokens, not only the tokens'
    # attention land on the object. Without it the colour word passed under 1 % of the object's
    # attention (the phrase's last words carried the colour) and re-weighting it changed nothing.
    ground_pixel_weight: float = 0.05
    # Phase 3: fine-tune the VAE decoder with the encoder frozen (so the latent space, the cache and
    # the UNet stay valid; as Stability's ft-MSE decoder for SD). Object pixels (masks dilated by
    # 2 px) weigh ``object_weight`` in the loss: after phase 1 the decoder spent its capacity on the
    # background patterns and drew objects as blobs (reconstructions scored 44 % on shape).
    decoder_steps: int = 3000
    decoder_lr: float = 3e-4  # cosine-decayed to 10 % over decoder_steps
    object_weight: float = 10.0
    # Fine-tuning (finetune_config): start the UNet phase from this diffusers folder's UNet and text
    # encoder, with its VAE frozen (vae_steps and decoder_steps must be 0) and its scaling factor.
    finetune_from: str | None = None
    layout_share: float = 0.0  # share of the latent cache drawn from free layouts (dataset.sample_layout)
    place_dropout: float = 0.0  # anchored captions drop their place clauses this often (needs a mixed cache)
    probe_lr: float | None = None  # the caption probe's learning rate (None: lr)
    probe_fit_steps: int = 0  # for this many steps the probe learns from the encoder output without moving it

    def __post_init__(self):
        if not 0 <= self.caption_dropout < 1 or not 0 <= self.clause_dropout < 1 or not 0 <= self.place_dropout < 1:
            raise ValueError("dropout probabilities must be in [0, 1)")
        if not 0 <= self.layout_share <= 1:
            raise ValueError("layout_share must be in [0, 1]")
        if self.finetune_from is None and (self.layout_share or self.place_dropout):
            raise ValueError("layout_share and place_dropout need a fine-tune (finetune_from)")
        if self.finetune_from is not None and (self.vae_steps or self.decoder_steps):
            raise ValueError("a fine-tune keeps the folder's VAE: vae_steps and decoder_steps must be 0")
        if min(self.aux_weight, self.ground_weight, self.ground_pixel_weight) < 0 or self.object_weight < 1:
            raise ValueError("aux_weight, ground_weight and ground_pixel_weight must be >= 0, object_weight >= 1")
        if min(self.vae_steps, self.steps, self.decoder_steps) < 0 or min(self.batch, self.vae_batch, self.cache_size) < 1:
            raise ValueError("steps must be >= 0; batch sizes and cache_size >= 1")


_VAE_KEYS = ("vae_channels", "latent_channels", "image_size", "vae_groups")

# What a fine-tune changes from the full run's defaults (finetune_config): the final phase's losses from
# step 0, a lower learning rate with a short warm-up, a fresh caption probe fitted alone for its first
# steps at the full run's rate (a random probe would push the encoder in random directions).
FINETUNE = {"vae_steps": 0, "decoder_steps": 0, "lr": 2e-4, "warmup": 100, "zero_snr_from": 0, "aux_from": 0,
            "ground_from": 0, "steps": 10_000, "layout_share": 0.5, "place_dropout": 0.2, "probe_lr": 1e-3,
            "probe_fit_steps": 500}


def finetune_config(folder: str | Path = SHIPPED, **overrides) -> TrainConfig:
    """The fine-tune defaults (``FINETUNE``) from ``folder``, with ``overrides``."""
    return TrainConfig(**{**FINETUNE, "finetune_from": str(folder), **overrides})


def _norm(v):
    return tuple(v) if isinstance(v, list) else v


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pixels(samples: list[dataset.Sample]) -> torch.Tensor:
    """(B, 3, 64, 64) in [-1, 1] for the samples' images."""
    arr = np.stack([s.image for s in samples])  # (B, 64, 64, 3) uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def images_tensor(seeds) -> torch.Tensor:
    """(B, 3, 64, 64) in [-1, 1] for the generator's images of ``seeds``."""
    return pixels([dataset.sample(int(s)) for s in seeds])


def cosine_to_tenth(base: float, step: int, total: int) -> float:
    """Learning rate ``base`` cosine-decayed to ``base / 10`` over ``total`` steps."""
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dtype.is_floating_point:
                ema[name].lerp_(p, 1 - decay)
            else:
                ema[name].copy_(p)


def _save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _vae_step(c: Components, opt, cfg: TrainConfig, g: torch.Generator, device) -> float:
    seeds = torch.randint(0, EVAL_SEED0, (cfg.vae_batch,), generator=g)
    x = images_tensor(seeds.tolist()).to(device)
    post = c.vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
    rec = c.vae.decode(z).sample
    loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + cfg.kl_weight * post.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def object_weights(masks: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weights: ``weight`` on objects dilated by 2 px, 1 elsewhere."""
    grown = F.max_pool2d(masks.float(), 5, stride=1, padding=2)  # masks: (B, 1, H, W) bool
    return 1 + (weight - 1) * grown


def _decoder_step(c: Components, opt, cfg: TrainConfig, g: torch.Generator, device) -> float:
    """One step of phase 3: reconstruct fresh images from the frozen encoder's latent means."""
    seeds = torch.randint(0, EVAL_SEED0, (cfg.vae_batch,), generator=g).tolist()
    samples = [dataset.sample(int(s)) for s in seeds]
    x = pixels(samples)
    masks = torch.from_numpy(np.stack([s.masks.any(0) for s in samples]))[:, None]  # (B, 1, 64, 64)
    x, w = x.to(device), object_weights(masks, cfg.object_weight).to(device)
    with torch.no_grad():
        z = c.vae.encode(x).latent_dist.mean  # what the cache (and so the UNet) sees
    rec = c.vae.decode(z).sample
    loss = (w * ((rec - x) ** 2 + (rec - x).abs())).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def build_mixed_cache(c: Components, cfg: TrainConfig, device, progress: bool = True) -> dict:
    """The fine-tune's cache: anchored scenes (seeds 0..) and a ``layout_share`` of free layouts (layout
    seeds 0..), with VAE latent means, token ids of 8 caption variants (index = no background + 2 × no
    style + 4 × no place; a free layout's place variants equal the others), probe labels (a third object
    has no probe head), object masks area-pooled to the latent grid (float16, exact), object counts, and
    the folder VAE's scaling factor (the UNet was trained with it)."""
    n_layout = round(cfg.layout_share * cfg.cache_size)
    jobs = [(0, s) for s in range(cfg.cache_size - n_layout)] + [(1, s) for s in range(n_layout)]
    variants = [(bg, st, pl) for pl in (True, False) for st in (True, False) for bg in (True, False)]
    latents, ids, labels, masks, counts = [], [], [], [], []
    for start in tqdm(range(0, len(jobs), 256), desc="latent cache", disable=not progress):
        chunk = jobs[start: start + 256]
        samples = [dataset.sample_layout(s) if kind else dataset.sample(s) for kind, s in chunk]
        z = c.vae.encode(pixels(samples).to(device)).latent_dist.mean.cpu()  # (b, 4, h, w)
        latents.append(z)
        caps = [dataset.caption(s.scene, bg, st, pl) for s in samples for bg, st, pl in variants]
        ids.append(tokenize(c.tokenizer, caps).view(len(samples), len(variants), -1).to(torch.int32))
        labels.append(torch.tensor([scene_labels(s.scene) for s in samples]))
        m = torch.zeros(len(samples), dataset.MAX_OBJECTS, *z.shape[-2:])
        for i, s in enumerate(samples):
            m[i, : len(s.masks)] = F.adaptive_avg_pool2d(torch.from_numpy(s.masks.astype(np.float32))[:, None],
                                                         z.shape[-2:])[:, 0]
        masks.append(m.flatten(2).half())
        counts.append(torch.tensor([len(s.masks) for s in samples], dtype=torch.uint8))
    kind = torch.tensor([k for k, _ in jobs], dtype=torch.uint8)
    seed = torch.tensor([s for _, s in jobs], dtype=torch.int64)
    return {"latents": torch.cat(latents), "ids": torch.cat(ids), "labels": torch.cat(labels),
            "masks": torch.cat(masks), "n_objects": torch.cat(counts), "kind": kind, "seed": seed,
            "scale": float(c.vae.config.scaling_factor)}


def cached_grounding_targets(cache: dict, idx: list[int], ids: torch.Tensor, keep: torch.Tensor,
                             comma_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grounding.grounding_targets`` from a mixed cache's pooled masks (no re-rendering)."""
    rows, positions, masks = [], [], []
    for b, i in enumerate(idx):
        if not keep[b]:
            continue
        n = int(cache["n_objects"][i])
        for o, toks in enumerate(object_token_positions(ids[b].tolist(), comma_id, n)):
            for t in toks:
                rows.append(b)
                positions.append(t)
                masks.append(cache["masks"][i, o].float())
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, cache["masks"].shape[-1])
    return torch.tensor(rows), torch.tensor(positions), torch.stack(masks)


_POSITION_HEADS = [i for i, name in enumerate(HEADS) if name.startswith("position")]


@torch.no_grad()
def build_cache(c: Components, cfg: TrainConfig, device, progress: bool = True) -> dict:
    """VAE latent means and token ids (4 caption variants: full, -background, -style, -both)."""
    latents, ids = [], []
    variants = ((True, True), (False, True), (True, False), (False, False))
    for start in tqdm(range(0, cfg.cache_size, 256), desc="latent cache", disable=not progress):
        seeds = range(start, min(start + 256, cfg.cache_size))
        samples = [dataset.sample(s) for s in seeds]
        x = pixels(samples)
        latents.append(c.vae.encode(x.to(device)).latent_dist.mean.cpu())  # (b, 4, 16, 16)
        caps = [dataset.caption(s.scene, bg, st) for s in samples for bg, st in variants]
        ids.append(tokenize(c.tokenizer, caps).view(len(samples), len(variants), -1).to(torch.int32))
    lat = torch.cat(latents)
    return {"latents": lat, "ids": torch.cat(ids), "scale": float(1 / lat.std())}


def scheduler_at(cfg: TrainConfig, step: int):
    """The noise schedule UNet step ``step`` trains with (and an export after it ships)."""
    return build_scheduler(zero_terminal_snr=step >= cfg.zero_snr_from)


def grounded_blocks(unet) -> list[str]:
    """The cross-attention blocks at the latent resolution (the first down and the last up block)."""
    last = len(unet.up_blocks) - 1
    return [n for n, m in unet.named_modules() if n.endswith("attn2")
            and (n.startswith("down_blocks.0.") or n.startswith(f"up_blocks.{last}."))]


def _unet_step(c: Components, opt, cache: dict, empty_ids: torch.Tensor, cfg: TrainConfig,
               g: torch.Generator, device, probe: CaptionProbe | None = None,
               ground: tuple[list[str], int] | None = None,
               probe_fit: bool = False) -> tuple[float, float | None, float | None]:
    """One optimizer step; returns the diffusion loss, the caption probe's and the grounding loss (None if
    unused). ``ground``: (grounded block names, the comma's token id); ``probe_fit``: the probe learns
    from the detached encoder output."""
    sched = c.scheduler
    idx = torch.randint(0, len(cache["latents"]), (cfg.batch,), generator=g)
    keep_bg = torch.rand(cfg.batch, generator=g) >= cfg.clause_dropout
    keep_style = torch.rand(cfg.batch, generator=g) >= cfg.clause_dropout
    variant = (~keep_bg).long() + 2 * (~keep_style).long()
    keep_place = None
    if cfg.place_dropout > 0:  # drawn only then, so the full run's random stream is unchanged
        if cache["ids"].shape[1] < 8:
            raise ValueError("place_dropout needs a cache with place variants (build_mixed_cache)")
        keep_place = torch.rand(cfg.batch, generator=g) >= cfg.place_dropout
        variant = variant + 4 * (~keep_place).long()
    ids = cache["ids"][idx, variant].long()  # (B, L)
    drop = torch.rand(cfg.batch, generator=g) < cfg.caption_dropout
    ids[drop] = empty_ids
    x0 = cache["latents"][idx] * cache["scale"]  # (B, 4, 16, 16)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch,), generator=g)
    x0, noise, t, ids = x0.to(device), noise.to(device), t.to(device), ids.to(device)
    xt = sched.add_noise(x0, noise, t)
    target = sched.get_velocity(x0, noise, t)
    probs: list[torch.Tensor] = []
    capture = nullcontext() if ground is None else explicit_attention(
        c.unet, {name: (lambda call, p: probs.append(p)) for name in ground[0]})
    with capture:
        emb = c.text_encoder(ids)[0]  # (B, L, D)
        pred = c.unet(xt, t, emb).sample
    loss = F.mse_loss(pred, target)
    total = loss
    aux = grounded = None
    if probe is not None:
        labels = mask_dropped(cache["labels"][idx], keep_bg, keep_style, ~drop)
        if keep_place is not None:
            for j in _POSITION_HEADS:
                labels[~keep_place, j] = IGNORE
        aux = probe.loss(emb.detach() if probe_fit else emb, labels.to(device))
        total = total + cfg.aux_weight * aux
    if ground is not None:
        if "masks" in cache:
            rows, positions, masks = cached_grounding_targets(cache, idx.tolist(), ids.cpu(), ~drop, ground[1])
        else:
            rows, positions, masks = grounding_targets(idx.tolist(), ids.cpu(), ~drop, ground[1],
                                                       tuple(x0.shape[-2:]))
        if len(rows):
            maps, masks = grounded_maps(probs, rows.to(device), positions.to(device)), masks.to(device)
            grounded = cfg.ground_weight * token_loss(maps, masks) + cfg.ground_pixel_weight * pixel_loss(maps, masks)
            total = total + grounded
    opt.zero_grad(set_to_none=True)
    total.backward()
    params = opt.param_groups[0]["params"]  # the models; the probe is not clipped
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item(), None if aux is None else aux.item(), None if grounded is None else grounded.item()


def export(c: Components, ema: dict, folder: Path) -> Path:
    """Save the pipeline with the EMA weights of the UNet and text encoder."""
    live = {"unet": c.unet.state_dict(), "text_encoder": c.text_encoder.state_dict()}
    live = {k: {n: t.clone() for n, t in v.items()} for k, v in live.items()}
    c.unet.load_state_dict(ema["unet"])
    c.text_encoder.load_state_dict(ema["text_encoder"])
    try:
        return save_pipeline(c, folder)
    finally:
        c.unet.load_state_dict(live["unet"])
        c.text_encoder.load_state_dict(live["text_encoder"])


def _add_probe_group(state: dict, lr: float) -> None:
    """Give a checkpoint written before the caption probe existed the probe's optimizer group."""
    groups = state["opt"]["param_groups"]
    if len(groups) == 2:
        return
    first_free = max(i for g in groups for i in g["params"]) + 1
    groups.append({**groups[0], "params": [first_free], "weight_decay": 0.0, "lr": lr, "initial_lr": lr})
    state["sched"]["base_lrs"] = [*state["sched"]["base_lrs"], lr]
    state["sched"]["_last_lr"] = [*state["sched"]["_last_lr"], lr]


def train(cfg: TrainConfig = TrainConfig(), workdir: str | Path = ".train", export_to: str | Path | None = SHIPPED,
          device: str | torch.device | None = None, progress: bool = True,
          callback: Callable[[dict], None] | None = None) -> Components:
    """Run (or resume) training to ``cfg.vae_steps`` + ``cfg.steps`` + ``cfg.decoder_steps``; returns the
    live components."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(cfg.seed)
    c = build(cfg.model)
    c.vae.to(device)
    c.unet.to(device)
    c.text_encoder.to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    ckpt_path = workdir / "ckpt.pt"
    state = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    if state is not None:
        saved, now = state["model_config"], asdict(cfg.model)
        keys = _VAE_KEYS if state["phase"] == "vae" else now.keys()  # the UNet may change before it trains
        if any(_norm(saved.get(k)) != _norm(now[k]) for k in keys):
            raise ValueError(f"{ckpt_path} was trained with another model config; use a fresh workdir")
        if state["train_config"].get("finetune_from") != cfg.finetune_from:
            raise ValueError(f"{ckpt_path} is from a run with finetune_from={state['train_config'].get('finetune_from')!r}, "
                             f"not {cfg.finetune_from!r}; use a fresh workdir")
    cb = callback or (lambda info: None)
    if cfg.finetune_from is not None:  # its weights are the start; a checkpoint's (below) replace them
        _load_folder(c, Path(cfg.finetune_from))

    # --- phase 1: VAE -----------------------------------------------------------------------------
    vae_opt = torch.optim.AdamW(c.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae_step = 0
    if state is not None:
        c.vae.load_state_dict(state["vae"])
        vae_step = state["vae_step"]
        if state["phase"] == "vae":
            vae_opt.load_state_dict(state["vae_opt"])
            g.set_state(state["rng"])
    if vae_step < cfg.vae_steps:
        c.vae.train()
        bar = tqdm(total=cfg.vae_steps, initial=vae_step, desc="vae", disable=not progress)
        while vae_step < cfg.vae_steps:
            for group in vae_opt.param_groups:
                group["lr"] = cosine_to_tenth(cfg.vae_lr, vae_step, cfg.vae_steps)
            loss = _vae_step(c, vae_opt, cfg, g, device)
            vae_step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            cb({"phase": "vae", "step": vae_step, "loss": loss})
            if vae_step % cfg.ckpt_every == 0 or vae_step == cfg.vae_steps:
                _save({"phase": "vae", "vae_step": vae_step, "vae": c.vae.state_dict(),
                       "vae_opt": vae_opt.state_dict(), "rng": g.get_state(),
                       "model_config": asdict(cfg.model), "train_config": asdict(cfg)}, ckpt_path)
        bar.close()
        state = torch.load(ckpt_path, weights_only=False)
    c.vae.eval().requires_grad_(False)

    # --- latent cache -----------------------------------------------------------------------------
    if cfg.finetune_from is None:
        cache_path = workdir / f"cache-{cfg.cache_size}.pt"
    else:
        cache_path = workdir / f"cache-{cfg.cache_size}-layout{cfg.layout_share:g}.pt"
    if cache_path.exists() and ((state or {}).get("phase") in ("unet", "decoder") or cfg.finetune_from is not None):
        cache = torch.load(cache_path, weights_only=False)  # a fine-tune's VAE never changes: always reusable
    else:
        make = build_cache if cfg.finetune_from is None else build_mixed_cache
        cache = make(c, cfg, device, progress)
        _save(cache, cache_path)
    c.vae.register_to_config(scaling_factor=cache["scale"])
    empty_ids = tokenize(c.tokenizer, [""])[0].to(torch.long)

    # --- phase 2: UNet + text encoder -------------------------------------------------------------
    if "labels" not in cache:
        cache["labels"] = labels_for_seeds(len(cache["latents"]))
    probe = CaptionProbe(cfg.model.max_length, cfg.model.text_dim,
                         generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    params = list(c.unet.parameters()) + list(c.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    opt.add_param_group({"params": list(probe.parameters()), "weight_decay": 0.0,
                         **({} if cfg.probe_lr is None else {"lr": cfg.probe_lr})})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    step = 0
    if state is not None and state["phase"] == "decoder" and cfg.steps > state["step"]:
        raise ValueError(f"{ckpt_path} is past the UNet phase (step {state['step']}); use a fresh workdir "
                         "to train the UNet longer")
    if state is not None and state["phase"] in ("unet", "decoder"):
        _add_probe_group(state, cfg.lr)
        c.unet.load_state_dict(state["unet"])
        c.text_encoder.load_state_dict(state["text_encoder"])
        if "probe" in state:
            probe.load_state_dict(state["probe"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema = state["ema"]
        step = state["step"]
        g.set_state(state["rng"])
    else:
        ema = {"unet": {k: v.detach().clone() for k, v in c.unet.state_dict().items()},
               "text_encoder": {k: v.detach().clone() for k, v in c.text_encoder.state_dict().items()}}

    def unet_checkpoint() -> dict:
        return {"phase": "unet", "vae_step": vae_step, "step": step, "vae": c.vae.state_dict(),
                "unet": c.unet.state_dict(), "text_encoder": c.text_encoder.state_dict(), "ema": ema,
                "probe": probe.state_dict(),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": g.get_state(),
                "scale": cache["scale"], "model_config": asdict(cfg.model), "train_config": asdict(cfg)}

    ground = (grounded_blocks(c.unet), c.tokenizer.convert_tokens_to_ids(",</w>"))
    c.unet.train()
    c.text_encoder.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="unet", disable=not progress)
    while step < cfg.steps:
        c.scheduler = scheduler_at(cfg, step)
        use_probe = cfg.aux_weight > 0 and step >= cfg.aux_from
        use_ground = cfg.ground_weight + cfg.ground_pixel_weight > 0 and step >= cfg.ground_from
        loss, aux, grounded = _unet_step(c, opt, cache, empty_ids, cfg, g, device, probe if use_probe else None,
                                         ground if use_ground else None, probe_fit=step < cfg.probe_fit_steps)
        sched.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema["unet"], c.unet, decay)
        ema_update(ema["text_encoder"], c.text_encoder, decay)
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")
        info = {"phase": "unet", "step": step, "loss": loss, "lr": sched.get_last_lr()[0]}
        if aux is not None:
            info["probe_loss"] = aux
        if grounded is not None:
            info["grounding_loss"] = grounded
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            ckpt = unet_checkpoint()
            _save(ckpt, ckpt_path)
            if cfg.keep_every and step % cfg.keep_every == 0:
                _save(ckpt, workdir / f"ckpt-{step}.pt")
            info["checkpoint"] = str(ckpt_path)
        if export_to is not None and (step % cfg.export_every == 0 or step == cfg.steps):
            c.scheduler = scheduler_at(cfg, step)
            info["exported"] = str(export(c, ema, Path(export_to)))
        cb(info)
    bar.close()
    c.unet.eval()
    c.text_encoder.eval()
    c.scheduler = scheduler_at(cfg, step)  # what exports ship, also when phase 2 had nothing left to do

    # --- phase 3: decoder fine-tune, encoder frozen -------------------------------------------------
    dec_params = list(c.vae.decoder.parameters()) + list(c.vae.post_quant_conv.parameters())
    dec_opt = torch.optim.AdamW(dec_params, lr=cfg.decoder_lr, weight_decay=0.0)
    dec_step = 0
    dg = torch.Generator().manual_seed(cfg.seed + 2)  # its own draws: the same decoder however long phase 2 ran
    if state is not None and state["phase"] == "decoder":
        dec_opt.load_state_dict(state["dec_opt"])
        dec_step = state["dec_step"]
        dg.set_state(state["dec_rng"])
    if dec_step < cfg.decoder_steps:
        c.vae.decoder.train()
        for p in dec_params:
            p.requires_grad_(True)
        bar = tqdm(total=cfg.decoder_steps, initial=dec_step, desc="decoder", disable=not progress)
        while dec_step < cfg.decoder_steps:
            for group in dec_opt.param_groups:
                group["lr"] = cosine_to_tenth(cfg.decoder_lr, dec_step, cfg.decoder_steps)
            loss = _decoder_step(c, dec_opt, cfg, dg, device)
            dec_step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            info = {"phase": "decoder", "step": dec_step, "loss": loss}
            if dec_step % cfg.ckpt_every == 0 or dec_step == cfg.decoder_steps:
                _save({**unet_checkpoint(), "phase": "decoder", "dec_step": dec_step, "dec_opt": dec_opt.state_dict(),
                       "dec_rng": dg.get_state()}, ckpt_path)
                info["checkpoint"] = str(ckpt_path)
            if export_to is not None and (dec_step % cfg.export_every == 0 or dec_step == cfg.decoder_steps):
                info["exported"] = str(export(c, ema, Path(export_to)))
            cb(info)
        bar.close()
        c.vae.eval().requires_grad_(False)
    return c


def _load_folder(c: Components, folder: Path) -> None:
    """Load a diffusers folder's VAE (with its scaling factor), UNet and text encoder into ``c`` (the
    fine-tune's starting point; the architecture must match ``cfg.model``, the tokenizer ``c.tokenizer``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    c.vae.load_state_dict(vae.state_dict())
    c.vae.register_to_config(scaling_factor=vae.config.scaling_factor)
    c.unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
    c.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict())
    if CLIPTokenizer.from_pretrained(folder / "tokenizer").get_vocab() != c.tokenizer.get_vocab():
        raise ValueError(f"{folder} has another tokenizer than the toy grammar's; cannot fine-tune it")


def export_checkpoint(workdir: str | Path, folder: str | Path) -> int:
    """Export the EMA weights of ``workdir/ckpt.pt`` as a diffusers folder; returns its UNet step."""
    c, state = components_from_checkpoint(Path(workdir) / "ckpt.pt")
    if state["phase"] == "vae":
        raise ValueError(f"{workdir}/ckpt.pt is still in the VAE phase; nothing to export yet")
    save_pipeline(c, folder)
    return state["step"]


def components_from_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[Components, dict]:
    """Rebuild the components stored in a ``ckpt.pt`` (EMA weights by default)."""
    state = torch.load(path, weights_only=False)
    mc = state["model_config"]
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in mc.items()})
    c = build(cfg)
    c.vae.load_state_dict(state["vae"])
    if state["phase"] in ("unet", "decoder"):
        tc = state["train_config"]
        c.scheduler = build_scheduler(zero_terminal_snr=state["step"] >= tc.get("zero_snr_from", 1 << 30))
        c.vae.register_to_config(scaling_factor=state["scale"])
        src = state["ema"] if use_ema else state
        c.unet.load_state_dict(src["unet"])
        c.text_encoder.load_state_dict(src["text_encoder"])
    return c, state


if __name__ == "__main__":
    from attnmod.toy.cli import main

    main(["train-toy", *__import__("sys").argv[1:]])
