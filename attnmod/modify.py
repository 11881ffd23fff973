"""AttnMod: scale the attention result of chosen UNet blocks by a per-step, per-image multiplier.

What is multiplied is exactly what the authors' reference code multiplies: the attention result
``softmax(QK^T/sqrt(d)) V`` with heads merged, *before* the output projection ``to_out`` — so the
projection's bias is not scaled and the transformer block's residual stays outside. We get there
without touching any processor: a forward pre-hook on ``attn.to_out[0]`` scales that Linear's input.
It therefore composes with every stock processor (SDPA, xformers, sliced, LoRA-wrapped projections)
and with other attnmod interventions that replace processors.

The step is explicit state (``steps.LoopClock``): a pre-forward hook on the UNet starts a new loop
when the scheduler's ``timesteps`` tensor is a new object (every pipeline call runs
``scheduler.set_timesteps``) and otherwise advances by one UNet call; callers that own their loop pass ``auto_step=False`` and call
``set_step(i)``. Per-step multipliers are compiled once per loop into a (steps, images) table.

On a UNet compiled by ``speed.compile_unet`` AttnMod adds no scale hooks: it writes each step's multipliers in
place into the UNet's ``speed.ScaleSlots`` (read by the compiled graph as tensors, so nothing recompiles) and
sets them back to ones on exit. A UNet compiled any other way is refused (it would ignore new hooks).

**fp16 overflow: the fp32 redo.** A large multiplier can push a half-precision UNet past fp16's largest value
(65504): the residual stream after the scaled block, then the UNet output, become inf/NaN
(``benchmarks/fp16_overflow.py`` measures where, per block). An fp32 output projection alone cannot save that, since
the fp16 residual stream cannot hold the result. So when a float16 UNet call in which some block is modified
(multiplier != 1 at that step) returns non-finite rows, AttnMod runs that same call again in fp32 — the UNet's own
fp16 weights cast up for the call and the very same tensors put back after (bit-exact), inputs cast up, the
redo invisible to step clocks (``steps.EXTRA_CALL``) — and replaces only the non-finite rows with the fp32 result
cast back to fp16. Finite calls keep the stock fp16 path untouched, fp32/bf16 UNets never check, and each redo is
recorded in ``AttnMod.overflows``. Cost: one fp32 UNet call per overflowing step (and the fp32 copy of the weights
while it runs). On by default; ``fp32_fallback(False)`` (a context manager) or ``AttnMod(...,
fp32_fallback=False)`` turns it off. Not on a UNet compiled by ``speed.compile_unet`` (no hooks there). Rows still
non-finite after the redo stay non-finite: the caller's per-image check (``generate.finite``) reports them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

from . import dit, speed
from .blocks import Block, list_blocks, resolve_blocks
from .schedule import Schedule, as_schedule
from .steps import EXTRA_CALL as _EXTRA_CALL
from .steps import LoopClock

_FP32_FALLBACK: ContextVar[bool] = ContextVar("attnmod_fp32_fallback", default=True)


@contextmanager
def fp32_fallback(enabled: bool = True) -> Iterator[None]:
    """Turn AttnMod's fp16-overflow redo in fp32 on or off (on by default) for UNet calls made inside."""
    token = _FP32_FALLBACK.set(bool(enabled))
    try:
        yield
    finally:
        _FP32_FALLBACK.reset(token)

Mods = Mapping[str, object]  # block selector -> Schedule | number | (start, rate[, accel]) | "text"


def normalize_mods(unet, mods: Mods, blocks: list[Block] | None = None) -> dict[str, Schedule]:
    """``{"U1A1A2": -5, "M0A0*": (1, 0.2)}`` -> ``{full block name: Schedule}`` (selectors resolved)."""
    blocks = blocks if blocks is not None else list_blocks(unet)
    out: dict[str, Schedule] = {}
    for selector, value in mods.items():
        schedule = as_schedule(value)
        for block in resolve_blocks(blocks, selector):
            out[block.name] = schedule
    return out


def scale_attention_output(hidden: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """AttnMod's operation: ``m * softmax(QK^T)V`` per image, before ``to_out``.

    hidden: (B, N, C) merged-head attention result; multiplier: (B, 1, 1).
    """
    return hidden * multiplier


class AttnMod:
    """Context manager installing AttnMod on a pipeline (or a bare UNet); restores it on exit.

    ``mods`` is one mapping for the whole batch, or a sequence of mappings, one per image of the
    batch (a scan packs many settings into one batch). With classifier-free guidance the UNet batch
    is a multiple of the number of images and each image's multiplier is applied to all its copies.
    """

    def __init__(self, target, mods: Mods | Sequence[Mods], *, auto_step: bool = True, on_step=None,
                 fp32_fallback: bool | None = None):
        self.unet = dit.denoiser(target)  # a UNet, or an SD3 / FLUX transformer (``dit``)
        if speed.is_compiled(self.unet) and speed.scale_slots(self.unet) is None:
            what = "SD3 / FLUX transformer" if dit.is_dit(self.unet) else "UNet"
            raise RuntimeError(f"this {what} was compiled without attnmod, so it would ignore AttnMod's hooks; "
                               "compile it with attnmod.speed.compile_unet(pipe) instead")
        self._owner = target if hasattr(target, "scheduler") else None
        per_image = [mods] if isinstance(mods, Mapping) else list(mods)
        if not per_image:
            raise ValueError("modify() needs at least one mapping of block -> schedule")
        all_blocks = list_blocks(self.unet)
        self.per_image = [normalize_mods(self.unet, m, all_blocks) for m in per_image]
        names = {n for m in self.per_image for n in m}
        self.blocks = [b for b in all_blocks if b.name in names]
        self.auto_step = auto_step
        self.on_step = on_step  # on_step(ctl, unet_args, unet_kwargs): may call the UNet, set_multipliers
        self._handles: list = []
        self._is_dit = dit.is_dit(self.unet)
        self._clock = LoopClock(self._owner, scheduler_steps=self._is_dit)
        self._text_tokens = 0  # text tokens of the current DiT call (FLUX single blocks scale rows by stream)
        self._tables: dict[str, torch.Tensor] = {}  # name -> (steps, images) on the UNet's device
        self._neutral: dict[str, np.ndarray] = {}  # name -> (steps,) bool: every image at 1.0
        self._current: dict[str, torch.Tensor | None] = {}  # name -> (B, 1, 1) for this step
        self._slots = None  # speed.ScaleSlots of a compiled UNet while installed
        self.fp32_fallback = fp32_fallback  # None: as ``fp32_fallback()`` says (on by default)
        self.overflows: list[dict] = []  # fp16 calls redone in fp32: {"step", "rows", "rescued"}
        self.reset()

    # -- schedules ---------------------------------------------------------------------------------
    def compile(self, num_steps: int) -> dict[str, np.ndarray]:
        """Per-block multiplier tables of shape (num_steps, images), float64."""
        return {
            b.name: np.stack([m.get(b.name, Schedule()).compile(num_steps) for m in self.per_image], axis=1)
            for b in self.blocks
        }

    def _loop_length(self) -> int:
        """UNet calls in the scheduler's loop; without a scheduler, the longest list schedule."""
        scheduler = getattr(self._owner, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None:
            return len(timesteps) - (getattr(scheduler, "begin_index", None) or 0)
        lengths = {len(s.values) for m in self.per_image for s in m.values() if s.values is not None}
        if len(lengths) > 1:
            raise ValueError(f"list schedules of different lengths {sorted(lengths)} in one run")
        return lengths.pop() if lengths else 10_000

    def start_loop(self, num_steps: int, device=None, dtype=None) -> None:
        """Compile the schedules for a loop of ``num_steps`` UNet calls (done once per loop)."""
        tables = self.compile(num_steps)
        device = device or self.unet.device
        dtype = dtype or self.unet.dtype  # once: ``unet.dtype`` walks every module
        self._tables = {n: torch.as_tensor(t, dtype=dtype, device=device) for n, t in tables.items()}
        self._neutral = {n: (t == 1.0).all(axis=1) for n, t in tables.items()}
        self._num_steps = num_steps
        self.step = -1

    # -- the step ------------------------------------------------------------------------------------
    def set_step(self, step: int, batch_size: int | None = None) -> None:
        """Select the multipliers of ``step`` for a UNet batch of ``batch_size`` (images × CFG copies)."""
        if not 0 <= step < self._num_steps:
            raise ValueError(
                f"UNet call #{step} but the schedules cover {self._num_steps} steps "
                "(a list schedule needs one value per UNet call of the loop)"
            )
        images = len(self.per_image)
        batch_size = batch_size or images
        if batch_size % images:
            raise ValueError(f"UNet batch of {batch_size} is not a multiple of the {images} per-image settings")
        self.step = step
        self._current = {
            name: None if self._neutral[name][step] else table[step].repeat(batch_size // images).view(-1, 1, 1)
            for name, table in self._tables.items()
        }
        if self._slots is not None:
            for name, table in self._tables.items():
                self._slots.write(name, table[step], batch_size)

    def set_multipliers(self, multipliers: Mapping[str, torch.Tensor], batch_size: int) -> None:
        """Override this step's multipliers: block name -> (images,) tensor, for a UNet batch of ``batch_size``.

        For callers that decide multipliers as the loop runs (greedy strategies); blocks not given keep
        theirs.
        """
        dtype, device = self.unet.dtype, self.unet.device  # once: each walks every module
        for name, values in multipliers.items():
            if name not in self._tables:
                raise ValueError(f"block {name!r} is not installed in this AttnMod")
            values = torch.as_tensor(values, dtype=dtype, device=device).flatten()
            if batch_size % values.numel():
                raise ValueError(f"UNet batch of {batch_size} is not a multiple of {values.numel()} settings")
            self._current[name] = values.repeat(batch_size // values.numel()).view(-1, 1, 1)
            if self._slots is not None:
                self._slots.write(name, values, batch_size)

    @torch.compiler.disable  # host-side bookkeeping: never traced into a compiled UNet
    def _on_unet_call(self, module, args, kwargs):
        if _EXTRA_CALL.get():
            return None  # a UNet call made by an on_step callback, not a step of the loop
        sample = denoiser_input(args, kwargs)
        context = kwargs.get("encoder_hidden_states")
        self._text_tokens = context.shape[1] if self._is_dit and context is not None else 0
        if self.auto_step:
            if self._clock.tick() or self._num_steps is None:
                self.start_loop(self._loop_length(), sample.device)
            self.set_step(self._clock.step, sample.shape[0])
        elif self._num_steps is None or self.step < 0:
            raise RuntimeError("with auto_step=False call start_loop(n) and set_step(i) before the UNet runs")
        else:
            self.set_step(self.step, sample.shape[0])
        if self.on_step is not None:
            token = _EXTRA_CALL.set(True)
            try:
                self.on_step(self, args, kwargs)
            finally:
                _EXTRA_CALL.reset(token)
        return None

    def reset(self) -> None:
        """Forget the current loop; the next UNet call starts a new one."""
        self.step = -1
        self._num_steps = None
        self._clock.reset()
        self._tables, self._neutral, self._current = {}, {}, {}

    def _scale_hook(self, name: str):
        def hook(module, args):
            multiplier = self._current.get(name)
            if multiplier is None:
                return None
            hidden = args[0]
            if multiplier.dtype != hidden.dtype:
                multiplier = multiplier.to(hidden.dtype)
            return (scale_attention_output(hidden, multiplier), *args[1:])

        return hook

    # -- fp16 overflow: redo the call in fp32 --------------------------------------------------------
    @torch.compiler.disable
    def _after_unet_call(self, module, args, kwargs, output):
        if _EXTRA_CALL.get() or not (_FP32_FALLBACK.get() if self.fp32_fallback is None else self.fp32_fallback):
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        if sample.dtype != torch.float16 or all(m is None for m in self._current.values()):
            return None  # fp32 / bf16, or nothing modified at this step: the stock path, unchecked
        bad = ~torch.isfinite(sample).flatten(1).all(1)  # (B,)
        if not bad.any():
            return None
        redo = run_in_fp32(module, args, kwargs)
        redo = redo[0] if isinstance(redo, tuple) else redo.sample
        fixed = torch.where(bad.view(-1, *[1] * (sample.ndim - 1)), redo.to(sample.dtype), sample)
        rows = bad.nonzero().flatten()
        self.overflows.append({"step": self.step, "rows": rows.tolist(),
                               "rescued": bool(torch.isfinite(fixed[rows]).all())})
        if isinstance(output, tuple):
            return (fixed, *output[1:])
        output.sample = fixed
        return output

    def _getter(self, name: str):
        return lambda: self._current.get(name)

    # -- install / restore ---------------------------------------------------------------------------
    def __enter__(self) -> AttnMod:
        if self._handles:
            raise RuntimeError("this AttnMod is already installed")
        if not self.blocks:
            return self  # nothing to modify: no hooks at all
        slots = speed.scale_slots(self.unet)
        if slots is not None:  # compiled: no hook at all (dynamo guards on hooks), the slots call us
            if slots.listener is not None:
                raise RuntimeError("another AttnMod is already installed on this compiled UNet")
            slots.listener, self._slots = self._on_unet_call, slots
            self.reset()
            return self
        try:
            self._handles.append(self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True))
            self._handles.append(self.unet.register_forward_hook(self._after_unet_call, with_kwargs=True))
            for block in self.blocks:
                if self._is_dit:
                    self._handles += dit.scale_hooks(self.unet, block.name, self._getter(block.name),
                                                     lambda: self._text_tokens)
                    continue
                to_out = self.unet.get_submodule(block.name).to_out[0]
                self._handles.append(to_out.register_forward_pre_hook(self._scale_hook(block.name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.reset()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._current = {}
        if self._slots is not None:
            self._slots.listener = None
            self._slots.clear([b.name for b in self.blocks])
            self._slots = None


def run_in_fp32(module, args, kwargs):
    """``module(*args, **kwargs)`` computed in fp32, as an extra call of the step: half-precision parameters and
    buffers cast up for the call (the original tensors are put back after, so nothing changes bit for bit), and
    floating inputs (nested in dicts, lists and tuples too) cast up."""
    def up(value):
        if isinstance(value, torch.Tensor):
            return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
        if isinstance(value, dict):
            return {k: up(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(up(v) for v in value)
        return value

    tensors = [t for t in itertools.chain(module.parameters(), module.buffers())
               if t.dtype in (torch.float16, torch.bfloat16)]
    originals = [t.data for t in tensors]
    token = _EXTRA_CALL.set(True)
    try:
        for t, data in zip(tensors, originals, strict=True):
            t.data = data.float()
        return module(*up(args), **up(kwargs))
    finally:
        for t, data in zip(tensors, originals, strict=True):
            t.data = data
        _EXTRA_CALL.reset(token)


def denoiser_input(args, kwargs) -> torch.Tensor:
    """The latent input of a UNet (``sample``) or DiT transformer (``hidden_states``) call."""
    if args:
        return args[0]
    return kwargs["sample"] if "sample" in kwargs else kwargs["hidden_states"]


def is_extra_call() -> bool:
    """True inside a UNet call made by an ``on_step`` callback rather than by the sampling loop."""
    return _EXTRA_CALL.get()


def modify(target, mods: Mods | Sequence[Mods], *, auto_step: bool = True, on_step=None,
           fp32_fallback: bool | None = None) -> AttnMod:
    """``with attnmod.modify(pipe, {"U1A1A2": Schedule(start=-5, rate=0.2)}): pipe(prompt)``."""
    return AttnMod(target, mods, auto_step=auto_step, on_step=on_step, fp32_fallback=fp32_fallback)
