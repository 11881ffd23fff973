"""Greedy multi-block strategies (AttnMod paper, Sec. 3.4 and Fig. 9).

All chosen blocks start at multiplier 0. At every denoising step, one block gains +1.0 (capped at
1.0): the one a *picker* chooses from how much each candidate's gain would change the UNet output
compared with the previous step's output (at step 0, with the output before any gain). Once every
block is at 1.0 the loop continues at default. The candidates of a step are evaluated together in
one batched UNet call (``candidate_batch`` limits its size) made from inside a UNet pre-forward hook
of the stock pipeline, so any pipeline works.

The chosen block per step is recorded as plain list schedules in the recipe, so ``generate`` remakes
the image exactly without searching again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .blocks import resolve_blocks
from .dit import denoiser
from .generate import NonFiniteImageError, describe, finite, render
from .modify import denoiser_input, is_extra_call, modify
from .recipe import Recipe, png_text, save_png, write_json
from .schedule import Schedule

Picker = Callable[[torch.Tensor, Sequence[str], int], int]  # (deltas (K,), candidates, step) -> index


def most_influential(deltas: torch.Tensor, candidates: Sequence[str], step: int) -> int:
    """The candidate whose +1.0 changes the UNet output most (paper Fig. 9a)."""
    return int(torch.argmax(deltas))


def least_influential(deltas: torch.Tensor, candidates: Sequence[str], step: int) -> int:
    """The candidate whose +1.0 changes the UNet output least (paper Fig. 9b)."""
    return int(torch.argmin(deltas))


PICKERS: dict[str, Picker] = {"most": most_influential, "least": least_influential}


def get_picker(picker: str | Picker) -> Picker:
    if callable(picker):
        return picker
    if picker not in PICKERS:
        raise ValueError(f"unknown picker {picker!r}; choose one of {', '.join(PICKERS)} or pass a function")
    return PICKERS[picker]


def output_change(candidates: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared change of each candidate's UNet output. candidates: (K, B, C, H, W); reference: (B, C, H, W)."""
    return (candidates.float() - reference.float()).pow(2).flatten(1).mean(1)  # (K,)


def expand_batch(value, batch: int, copies: int):
    """Repeat every tensor with a leading ``batch`` dim ``copies`` times per sample (nested dicts too).

    (B, ...) -> (B * copies, ...) ordered [s0 x copies, s1 x copies, ...], matching AttnMod's
    ``multipliers.repeat(B)`` layout of (copies,) per-candidate values.
    """
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.repeat_interleave(copies, dim=0)
    if isinstance(value, dict):
        return {k: expand_batch(v, batch, copies) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(expand_batch(v, batch, copies) for v in value)
    return value


@dataclass
class StrategyResult:
    image: np.ndarray  # (H, W, 3) in [0, 1]
    recipe: Recipe  # list schedules that remake the image without the search
    order: list[str | None]  # block chosen at each step (None once every block is at 1.0)


class GreedyStrategy:
    """The on-step logic: evaluate every candidate gain in batched UNet calls, let the picker choose."""

    def __init__(self, names: list[str], picker: Picker, candidate_batch: int | None = None):
        self.names = names
        self.picker = picker
        self.candidate_batch = candidate_batch
        self.levels = dict.fromkeys(names, 0.0)
        self.order: list[str | None] = []
        self.previous: torch.Tensor | None = None  # the UNet output of the previous step

    def remember_output(self, module, args, kwargs, output):
        self.previous = (output[0] if isinstance(output, tuple) else output.sample).detach()

    def __call__(self, ctl, args, kwargs) -> None:
        batch = denoiser_input(args, kwargs).shape[0]
        remaining = [n for n in self.names if self.levels[n] < 1.0]
        if remaining:
            # gains: +1 for one candidate; at step 0 also the no-gain baseline as the reference
            gains = [[n] for n in remaining] + ([[]] if self.previous is None else [])
            outputs = torch.cat([
                self._evaluate(ctl, args, kwargs, gains[i : i + (self.candidate_batch or len(gains))], batch)
                for i in range(0, len(gains), self.candidate_batch or len(gains))
            ])  # (K, B, C, H, W)
            reference = self.previous if self.previous is not None else outputs[-1]
            deltas = output_change(outputs[: len(remaining)], reference)
            choice = remaining[self.picker(deltas, remaining, ctl.step)]
            self.levels[choice] = min(1.0, self.levels[choice] + 1.0)
            self.order.append(choice)
        else:
            self.order.append(None)
        ctl.set_multipliers({n: torch.tensor([v]) for n, v in self.levels.items()}, batch)

    def _evaluate(self, ctl, args, kwargs, gains: list[list[str]], batch: int) -> torch.Tensor:
        k = len(gains)
        ctl.set_multipliers({
            n: torch.tensor([min(1.0, self.levels[n] + (n in g)) for g in gains]) for n in self.names
        }, batch * k)
        out = ctl.unet(*expand_batch(args, batch, k), **expand_batch(kwargs, batch, k))
        out = out[0] if isinstance(out, tuple) else out.sample  # (B*k, C, H, W), [s0 x k, s1 x k, ...]
        return out.view(batch, k, *out.shape[1:]).transpose(0, 1)  # (k, B, C, H, W)


def run_strategy(pipe, base: Recipe, *, blocks: str | list[str] = "all", picker: str | Picker = "most",
                 candidate_batch: int | None = None) -> StrategyResult:
    """Greedy multi-block AttnMod for ``base`` (its own mods are ignored); returns image, recipe, order.

    ``candidate_batch`` caps how many candidates share one UNet call (None: all; 1: one call each).
    """
    names = [b.name for b in resolve_blocks(pipe, blocks)]
    if not names:
        raise ValueError("a strategy needs at least one block")
    strategy = GreedyStrategy(names, get_picker(picker), candidate_batch)
    base = base.with_mods({})
    with modify(pipe, {n: Schedule(start=0.0) for n in names}, on_step=strategy):
        handle = denoiser(pipe).register_forward_hook(
            lambda m, a, k, o: None if is_extra_call() else strategy.remember_output(m, a, k, o),
            with_kwargs=True)
        try:
            image = render(pipe, [base])[0]
        finally:
            handle.remove()
    n = len(strategy.order)
    first = {name: step for step, name in enumerate(strategy.order) if name is not None}
    mods = {name: Schedule(values=tuple(float(i >= first.get(name, n)) for i in range(n))) for name in names}
    recipe = base.with_mods(mods)
    if not finite(image[None])[0]:
        raise NonFiniteImageError(f"the strategy's image came out non-finite (NaN/inf) for {describe(recipe)}")
    return StrategyResult(image, recipe, strategy.order)


def _strategy_batch(pipe, recipes: Sequence[Recipe], blocks, picker, candidate_batch) -> list[StrategyResult]:
    """``run_strategy`` for each recipe: the work an executor runs on one batch (see ``run_strategies``)."""
    return [run_strategy(pipe, r, blocks=blocks, picker=picker, candidate_batch=candidate_batch) for r in recipes]


def strategy_file(index: int, base: Recipe) -> str:
    """The file name of the ``index``-th strategy of a folder written by ``run_strategies``."""
    return f"{index:03d}-seed{base.seed}.png"


def run_strategies(pipe, bases: Sequence[Recipe], *, blocks: str | list[str] = "all", picker: str | Picker = "most",
                   candidate_batch: int | None = None, out: str | Path | None = None, executor=None,
                   progress: Callable[[int, int], None] | None = None) -> list[StrategyResult]:
    """``run_strategy`` for each of ``bases`` (e.g. prompts × seeds): independent images, so ``executor`` (as in
    ``sweep.run_scan``: ``None`` here, ``attnmod.distributed.RayExecutor`` on Ray workers) runs them one per batch.

    With ``out`` (locked for the run, as a scan's folder), this process writes ``out/<strategy_file>`` per image
    (the recipe that remakes it, and an ``attnmod_strategy`` chunk: blocks, picker, the base recipe and the block
    order) as each finishes, then ``out/strategies.json``; an image already there for the same base, blocks and
    picker is kept, not searched again (an interrupted run resumes). ``progress(done, total)`` after each image.
    """
    get_picker(picker)
    if not bases:
        raise ValueError("run_strategies needs at least one recipe")
    if not resolve_blocks(pipe, blocks):
        raise ValueError("a strategy needs at least one block")
    from .blocks import list_blocks
    from .lock import folder_lock
    from .sweep import LocalExecutor

    short = {b.name: b.short for b in list_blocks(pipe)}

    def short_order(result: StrategyResult) -> list[str | None]:
        return [short.get(n, n) if n else None for n in result.order]

    label = picker if isinstance(picker, str) else getattr(picker, "__name__", "custom")
    chunks = [{"blocks": blocks, "picker": label, "base": b.with_mods({}).to_dict()} for b in bases]
    out = Path(out) if out is not None else None
    with folder_lock(out) if out is not None else nullcontext():
        results: list[StrategyResult | None] = [None] * len(bases)
        if out is not None:
            for i, base in enumerate(bases):
                results[i] = _finished(out / strategy_file(i, base), chunks[i], short)
        pending = [i for i, r in enumerate(results) if r is None]
        work = partial(_strategy_batch, blocks=blocks, picker=picker, candidate_batch=candidate_batch)
        done = len(bases) - len(pending)
        for index, (result,) in (executor or LocalExecutor()).map(pipe, [[bases[i]] for i in pending], work):
            i = pending[index]
            results[i] = result
            if out is not None:
                save_png(result.image, out / strategy_file(i, bases[i]), result.recipe, short,
                         extra={"attnmod_strategy": {**chunks[i], "order": short_order(result)}})
            done += 1
            if progress is not None:
                progress(done, len(bases))
        if out is not None:
            write_json(out / "strategies.json", {"blocks": blocks, "picker": label, "images": [
                {"file": strategy_file(i, b), "prompt": b.prompt, "seed": b.seed,
                 "order": short_order(r)}
                for i, (b, r) in enumerate(zip(bases, results, strict=True))]})
    return results


def _finished(path: Path, chunk: dict, short: dict[str, str]) -> StrategyResult | None:
    """The result already at ``path`` when its ``attnmod_strategy`` chunk is the same job; else None."""
    import json

    from PIL import Image

    if not path.is_file():
        return None
    try:
        info = json.loads((png_text(path) or {}).get("attnmod_strategy", "null"))
        if not isinstance(info, dict) or {k: info.get(k) for k in chunk} != json.loads(json.dumps(chunk)):
            return None
        names = {s: n for n, s in short.items()}
        order = [names.get(s, s) if s else None for s in info["order"]]
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        return StrategyResult(image, Recipe.from_png(path), order)
    except Exception:  # unreadable, truncated or foreign: search it again (the file is replaced atomically)
        return None
