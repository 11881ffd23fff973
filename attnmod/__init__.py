"""attnmod: open up the attention layers of diffusers text-to-image models.

    with attnmod.modify(pipe, {"U1A1A2": attnmod.Schedule(start=-5, rate=0.2)}):
        image = pipe(prompt).images[0]
"""

from .blocks import Block, list_blocks, resolve_blocks
from .generate import NonFiniteImageError, generate, render
from .loading import ModelLoadError, load_pipeline
from .modify import AttnMod, fp32_fallback, modify
from .recipe import Recipe
from .schedule import Schedule
from .sweep import ScanResult, Sweep, run_scan

__version__ = "0.1.0"


def scan(pipe, prompt, *, blocks=("U1A1A2",), starts=(1.0,), rates=(0.0,), seeds=(0,), settings=None,
         prompts=None, steps=20, guidance=7.5, size=None, out=None, batch_size=8, progress=False, **kw) -> ScanResult:
    """An attention scan of ``blocks`` over ``starts`` x ``rates`` (see ``Sweep`` for every axis).

    Returns a ``ScanResult``: ``.images``, ``.tiles`` (with recipes) and ``.grid()``.
    """
    from .dit import native_size

    side = size or native_size(pipe)
    width, height = (side, side) if isinstance(side, int) else side
    sweep = Sweep(prompts=tuple(prompts or [prompt]), seeds=tuple(seeds), blocks=tuple(blocks),
                  starts=tuple(starts), rates=tuple(rates), settings=None if settings is None else tuple(settings))
    base = Recipe(prompt=prompt, steps=steps, guidance=guidance, width=width, height=height,
                  model=getattr(pipe, "name_or_path", "") or "pipeline", scheduler=type(pipe.scheduler).__name__, **kw)
    return run_scan(pipe, sweep, base, out=out, batch_size=batch_size, progress=progress)


__all__ = ["AttnMod", "Block", "ModelLoadError", "NonFiniteImageError", "Recipe", "ScanResult", "Schedule",
           "Sweep", "fp32_fallback", "generate", "list_blocks", "load_pipeline", "modify", "render",
           "resolve_blocks", "run_scan", "scan", "__version__"]
