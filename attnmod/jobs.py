"""A job from plain values: the prompt as the model reads it, the base recipe, a scan's sweep, finer
ranges around a tile, a list of block mods. The command line and the web page (``attnmod ui``) both
build their jobs here, so the same inputs give the same recipes, images and one-line errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import guards
from .loading import DEFAULT_MODEL, EMBEDDED, model_fingerprint, model_reference
from .recipe import Recipe
from .schedule import Schedule
from .sweep import Sweep, parse_values


def model_prompt(model: str | None, prompt: str) -> str:
    """``prompt`` as ``model`` reads it: the embedded models (``toy``, ``toy-layout``) read their training grammar
    only (a trailing full stop is dropped; other word orders or words are a ValueError); others take any text."""
    if (model or DEFAULT_MODEL) not in EMBEDDED or not prompt:
        return prompt
    from .toy.dataset import parse_caption

    prompt = prompt.strip().removesuffix(".").strip()
    parse_caption(prompt)
    return prompt


def base_recipe(pipe, model: str | None, prompt: str, seed: int = 0, *, negative_prompt: str = "",
                steps: int | None = None, guidance: float | None = None,
                size: tuple[int, int] | None = None) -> tuple[Recipe, list[str]]:
    """The recipe every image of a job starts from (the model's defaults where a value is None), and the
    warnings to show. A size the model cannot draw is a ValueError naming ``--size``."""
    from .defaults import model_defaults

    d = model_defaults(pipe)
    width, height = size or (d["width"], d["height"])
    warnings = []
    if (width, height) != (d["width"], d["height"]):
        native = f"{d['width']}x{d['height']}"
        if d.get("native_size_only"):
            raise ValueError(f"--size {width}x{height}: this model draws at {native} only (other sizes give copies "
                             "of the object or a blank image)")
        warnings.append(f"warning: this model's native size is {native}; at {width}x{height} it may repeat or lose "
                        "the subject")
    model = model or DEFAULT_MODEL
    recipe = Recipe(
        prompt=prompt, negative_prompt=negative_prompt, seed=seed,
        steps=steps or d["steps"], guidance=d["guidance"] if guidance is None else guidance,
        width=width, height=height, model=model_reference(model), scheduler=type(pipe.scheduler).__name__,
        model_id=model_fingerprint(model), device=str(pipe.device), dtype=str(pipe.dtype).removeprefix("torch."),
    )
    return recipe, warnings


def scan_sweep(prompts: Sequence[str], *, seed: str = "0", blocks: Sequence[str] | None = None,
               start: str | None = None, rate: str | None = None, accel: str = "0",
               settings: Sequence[str] = (), preset: str | None = None, pair: str | None = None,
               encoder_weights: Sequence[str] = (), x: str | None = None, y: str | None = None) -> Sweep:
    """The ``Sweep`` of ``attnmod scan``'s options, given as the text a user types (ranges ``a:b:n`` or
    ``v1,v2``; settings ``START:RATE[:ACCEL]``). Each malformed value is a one-line ValueError."""
    from .presets import preset as named_preset

    kw = dict(named_preset(preset)) if preset else {}
    if start is not None:
        kw["starts"] = parse_values(start)
    if rate is not None:
        kw["rates"] = parse_values(rate)
    if settings:
        kw["settings"] = tuple(Schedule.parse(s) for s in settings)
    blocks = list(blocks or ["U1A1A2"])
    if pair:
        a, sep, b = pair.partition(",")
        if not sep or not a or not b:
            raise ValueError(f"--pair expects two blocks A,B, got {pair!r}")
        blocks = [a, b, f"{a}+{b}"]
    return Sweep(
        prompts=tuple(prompts), seeds=tuple(guards.seed_values(seed)), blocks=tuple(blocks),
        starts=tuple(kw.get("starts", (1.0,))), rates=tuple(kw.get("rates", (0.0,))),
        accels=tuple(parse_values(accel)), settings=kw.get("settings"),
        encoder_weights=tuple(tuple(parse_values(w)) for w in encoder_weights), x=x, y=y,
    )


def scan_title(sweep: Sweep, base: Recipe) -> str:
    """The title ``attnmod scan`` gives its sheets: the prompt and seed when the scan has one of each."""
    return f"{base.prompt!r} · seed {sweep.seeds[0]}" if len(sweep.prompts) == 1 and len(sweep.seeds) == 1 else ""


def finer_range(values: Iterable[float], value: float, n: int = 5) -> str:
    """A range ``a:b:n`` centred on ``value``, one of a scan axis's ``values``, spanning to its nearest
    neighbours on that axis: ``n`` (odd, >= 3) values, so ``value`` is the middle one and the spacing is
    finer than the axis's whenever ``n`` > 3. An axis of one value spans ``value`` ± 1."""
    axis = sorted(set(float(v) for v in values))
    value = float(value)
    if value not in axis:
        raise ValueError(f"{value:g} is not a value of the axis ({', '.join(f'{v:g}' for v in axis)})")
    if n < 3 or n % 2 == 0:
        raise ValueError(f"a finer range needs an odd number of values >= 3, got {n}")
    i = axis.index(value)
    gaps = [abs(axis[j] - value) for j in (i - 1, i + 1) if 0 <= j < len(axis)]
    half = min(gaps) if gaps else 1.0
    return f"{round(value - half, 6):g}:{round(value + half, 6):g}:{n}"


def parse_mods(texts: Iterable[str], flag: str = "--mod") -> dict[str, Schedule]:
    """``["U1A1A2=-5:0.2", "M0A0*=2"]`` -> selector -> ``Schedule`` (resolve with ``modify.normalize_mods``)."""
    mods = {}
    for text in texts:
        block, sep, sched = text.partition("=")
        if not sep or not block.strip():
            raise ValueError(f"{flag} expects BLOCK=START[:RATE[:ACCEL]], got {text!r}")
        mods[block.strip()] = Schedule.parse(sched.strip())
    return mods


def mod_texts(recipe: Recipe, short_names: dict[str, str] | None = None) -> list[str]:
    """A recipe's mods as ``BLOCK=SCHEDULE`` lines (short block names where known): ``parse_mods`` reads
    them back into the same mods."""
    short = short_names or {}
    return [f"{short.get(name, name)}={schedule.to_text()}" for name, schedule in recipe.mods]
