"""AttnMod on a compiled UNet (``speed.compile_unet``): same images as eager, no recompilation per step or per
scan batch. A counting backend (``CompileCounter``: eager execution of the captured graphs) keeps this fast."""

import numpy as np
import pytest
import torch
from conftest import hook_count, run
from torch._dynamo.testing import CompileCounter

from attnmod import Recipe, Schedule, Sweep, modify, run_scan, speed
from attnmod.maps import trace
from attnmod.methods.p2p import EditOptions, edit
from attnmod.methods.style_aligned import StyleAlignedOptions, style_aligned
from attnmod.strategy import run_strategy
from attnmod.tiny import tiny_sd15

MOD_A = {"U1*": Schedule(start=-5, rate=0.2)}
MOD_B = {"U1*": Schedule(start=3, rate=-0.2), "D1A0A1": 2.0}
SWEEP = Sweep(prompts=("a red cat",), starts=(-5.0, 4.0), rates=(0.5,))  # 6 tiles (defaults included)
EDITS = (EditOptions(0.8, 0.4), EditOptions(0.3, 0.0))
BLEND = EditOptions(0.8, 0.4, local_blend=("cat",), blend_downsample=1)  # its mask accumulates inside the graph
NO_GROUP_NORM = StyleAlignedOptions(share_group_norm=False)  # no hooks on the group norms
BASE = Recipe("a red cat", steps=3, guidance=5.0, width=32, height=32, model="tiny")


@pytest.fixture(scope="module")
def compiled():
    """A tiny SD1.5 pipeline, its eager reference images, then the same pipeline compiled with a counter."""
    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    ref = {"stock": run(pipe), "a": _mod(pipe, MOD_A), "b": _mod(pipe, MOD_B), "a20": _mod(pipe, MOD_A, steps=20),
           "scan": [np.asarray(im) for im in run_scan(pipe, SWEEP, BASE, batch_size=3, progress=False).images],
           "maps": _maps(pipe), "style": _style(pipe), "style_no_gn": _style(pipe, options=NO_GROUP_NORM),
           "p2p": [_edit(pipe, o) for o in EDITS], "blend": _edit(pipe, BLEND), "strategy": run_strategy(pipe, BASE, blocks="U1*").image}
    counter = CompileCounter()
    speed.compile_unet(pipe, backend=counter)
    return pipe, ref, counter


def _mod(pipe, mods, steps=3):
    with modify(pipe, mods):
        return run(pipe, steps=steps)


def _maps(pipe, seed=0):
    with trace(pipe) as maps:
        run(pipe, seed=seed)
    return maps.cross


def _style(pipe, seed=0, options=None):
    with style_aligned(pipe, images=2, options=options or StyleAlignedOptions()):
        return run(pipe, prompt=["a red cat", "a blue house"], seed=seed)


def _edit(pipe, options, steps=3):
    result = edit(pipe, "a red cat", "a red dog", options=options, seed=0, steps=steps, guidance=5.0, width=32,
                  height=32)
    return np.asarray(result.edited)


def test_attnmod_on_compiled_unet_equals_eager_without_recompiling(compiled):
    pipe, ref, counter = compiled
    assert np.array_equal(run(pipe), ref["stock"])  # the slots at ones: bit-identical stock images
    warm = counter.frame_count
    assert warm >= 1
    assert np.array_equal(_mod(pipe, MOD_A), ref["a"])
    assert np.array_equal(_mod(pipe, MOD_A, steps=20), ref["a20"])  # a 20-step loop: every step a new value
    assert np.array_equal(_mod(pipe, MOD_B), ref["b"])  # another AttnMod, other blocks
    assert np.array_equal(run(pipe), ref["stock"])  # exit set the slots back to ones
    assert counter.frame_count == warm


def test_scan_batches_on_compiled_unet_do_not_recompile(compiled):
    pipe, ref, counter = compiled
    counts = []
    result = run_scan(pipe, SWEEP, BASE, batch_size=3, progress=False,
                      on_tiles=lambda tiles: counts.append(counter.frame_count))
    assert len(result.tiles) == 6 and len(counts) == 2  # two batches of three settings each
    assert counts[1] == counts[0]  # the first batch warms up its batch size; the second reuses it
    for image, expected in zip(result.images, ref["scan"], strict=True):
        assert np.array_equal(np.asarray(image), expected)


def test_compile_unet_leaves_only_its_slots_and_refuses_bad_input(compiled):
    pipe, _, _ = compiled
    slots = speed.scale_slots(pipe.unet)
    assert hook_count(pipe.unet) == len(slots.names) + 2  # one scale hook per block + the batch-size hooks
    with modify(pipe, MOD_A):
        assert hook_count(pipe.unet) == len(slots.names) + 2  # AttnMod adds no hook: the slots call it
    assert hook_count(pipe.unet) == len(slots.names) + 2
    with pytest.raises(ValueError, match="already compiled"):
        speed.compile_unet(pipe)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        speed.compile_unet(tiny_sd15(), mode="fast")


@pytest.mark.parametrize("how", ["method", "wrap"])
def test_unet_compiled_outside_attnmod_is_refused(how):
    pipe = tiny_sd15()
    if how == "method":
        pipe.unet.compile(backend="eager")
    else:
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    with pytest.raises(RuntimeError, match="compile_unet"):
        modify(pipe, MOD_A)


def test_maps_style_aligned_and_strategies_on_compiled_unet(compiled):
    """Processor-based methods recompile once for their first run (their processors are new code), not after."""
    pipe, ref, counter = compiled
    assert torch.equal(_maps(pipe), ref["maps"])
    warm = counter.frame_count
    _maps(pipe, seed=1)
    assert counter.frame_count == warm
    assert np.array_equal(_style(pipe), ref["style"])
    warm = counter.frame_count
    _style(pipe, seed=1)
    assert counter.frame_count == warm
    assert np.abs(run_strategy(pipe, BASE, blocks="U1*").image - ref["strategy"]).max() < 1e-6


def test_hooks_added_after_compiling_are_never_silently_dropped(compiled):
    """StyleAligned without, then with, hooks on the group norms: the second run must not reuse the first's graph
    (compile_unet makes dynamo guard on module hooks)."""
    pipe, ref, _ = compiled
    assert np.array_equal(_style(pipe, options=NO_GROUP_NORM), ref["style_no_gn"])
    assert np.array_equal(_style(pipe), ref["style"])
    assert not np.array_equal(ref["style"], ref["style_no_gn"])


def test_prompt_to_prompt_on_compiled_unet_equals_eager_without_recompiling_per_step(compiled):
    """The step and the replace windows reach the graph as tensors: a 20-step edit, and another edit with the same
    settings, reuse the first edit's graph; an edit that replaces no self-attention (EDITS[1]) adds one."""
    pipe, ref, counter = compiled
    assert np.array_equal(_edit(pipe, EDITS[0]), ref["p2p"][0])
    warm = counter.frame_count
    _edit(pipe, EDITS[0], steps=20)
    _edit(pipe, EditOptions(0.5, 0.2), steps=20)  # other windows, still some self-attention replaced
    assert counter.frame_count == warm
    assert np.array_equal(_edit(pipe, EDITS[1]), ref["p2p"][1])
    assert np.array_equal(_edit(pipe, EDITS[0]), ref["p2p"][0])
    assert counter.frame_count <= warm + 1
    assert np.array_equal(_edit(pipe, BLEND), ref["blend"])  # a local blend: one more graph, then no more
    warm = counter.frame_count
    _edit(pipe, BLEND, steps=20)
    assert counter.frame_count == warm

