"""torch.compile of an SD3 / FLUX transformer with AttnMod's scale slots (``speed.compile_unet``): the same images as
eager, no recompilation per step or per AttnMod."""

import numpy as np
import pytest
import torch
from conftest import run
from torch._dynamo.testing import CompileCounter

from attnmod import Schedule, modify, speed


def _mod(pipe, mods, steps=3):
    with modify(pipe, mods):
        return run(pipe, steps=steps)


@pytest.mark.parametrize("make", ["tiny_sd3", "tiny_flux"])
def test_attnmod_on_a_compiled_sd3_or_flux_transformer_equals_eager_without_recompiling(make):
    """The same scale slots on a DiT transformer: every stream's projection input (FLUX single blocks: the rows of
    the text or the image), ones until an AttnMod writes them in place."""
    from attnmod.dit import tiny as tiny_dit

    torch._dynamo.reset()  # compiled modules share nn.Module._call_impl's cache: start below its recompile limit
    pipe = getattr(tiny_dit, make)()
    pipe.set_progress_bar_config(disable=True)
    mods_a, mods_b = {"J*": Schedule(-5, 0.5)}, {"all": Schedule(3, -0.5)}  # FLUX "all" has single blocks
    ref = {"stock": run(pipe), "a": _mod(pipe, mods_a), "b": _mod(pipe, mods_b), "a5": _mod(pipe, mods_a, steps=5)}
    counter = CompileCounter()
    speed.compile_unet(pipe, backend=counter)
    assert speed.is_compiled(pipe.transformer)
    assert np.array_equal(run(pipe), ref["stock"])
    warm = counter.frame_count
    assert warm >= 1
    assert np.array_equal(_mod(pipe, mods_a), ref["a"])
    assert np.array_equal(_mod(pipe, mods_a, steps=5), ref["a5"])
    assert np.array_equal(_mod(pipe, mods_b), ref["b"])
    assert np.array_equal(run(pipe), ref["stock"])
    assert counter.frame_count == warm
