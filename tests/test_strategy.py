import numpy as np
import pytest
import torch

from attnmod import Recipe, Schedule, generate
from attnmod.blocks import resolve_blocks
from attnmod.modify import modify
from attnmod.strategy import run_strategy

BASE = Recipe("a red cat", steps=5, guidance=5.0, width=32, height=32, model="tiny")


def slow_reference_order(pipe, base, names, pick=np.argmax):
    """The paper's greedy loop written plainly: one UNet call per candidate, every step."""
    levels = dict.fromkeys(names, 0.0)
    order, previous = [], {}

    def on_step(ctl, args, kwargs):
        batch = args[0].shape[0]
        remaining = [n for n in names if levels[n] < 1]
        if remaining:
            def output_with(gain):
                ctl.set_multipliers({n: torch.tensor([min(1.0, levels[n] + (n == gain))]) for n in names}, batch)
                return ctl.unet(*args, **kwargs)[0]  # the pipeline asks for return_dict=False
            reference = previous.get("out")
            if reference is None:
                reference = output_with(None)
            deltas = [float((output_with(n) - reference).pow(2).mean()) for n in remaining]
            choice = remaining[int(pick(deltas))]
            levels[choice] = 1.0
            order.append(choice)
        else:
            order.append(None)
        ctl.set_multipliers({n: torch.tensor([levels[n]]) for n in names}, batch)

    from attnmod.generate import render
    from attnmod.modify import is_extra_call

    with modify(pipe, {n: Schedule(0.0) for n in names}, on_step=on_step):
        h = pipe.unet.register_forward_hook(
            lambda m, a, o: None if is_extra_call() else previous.__setitem__("out", o[0].detach()))
        try:
            image = render(pipe, [base])[0]
        finally:
            h.remove()
    return order, image


@pytest.mark.parametrize("picker, pick", [("most", np.argmax), ("least", np.argmin)])
def test_batched_greedy_matches_the_slow_loop_and_its_recipe_remakes_the_image(sd, picker, pick):
    names = [b.name for b in resolve_blocks(sd.unet, "U1*+M0*")]  # 8 blocks, 5 steps
    result = run_strategy(sd, BASE, blocks="U1*+M0*", picker=picker)
    order, image = slow_reference_order(sd, BASE, names, pick)
    assert result.order == order
    assert np.abs(result.image - image).max() < 1e-4
    assert len(set(result.order)) == 5  # one new block per step
    remade = generate(sd, result.recipe)  # plain list schedules, no search
    assert np.array_equal(remade, result.image)
    first = result.order[0]
    assert first not in result.recipe.mods_dict  # at 1.0 from step 0: no change, dropped from the recipe
    chosen_late = result.order[3]
    assert result.recipe.mods_dict[chosen_late].values == (0, 0, 0, 1, 1)


def test_after_every_block_is_at_one_the_loop_runs_at_default(sd):
    result = run_strategy(sd, BASE, blocks="M0A0A1+M0A0A2", candidate_batch=1)
    assert result.order[2:] == [None, None, None]
    assert set(result.order[:2]) == {b.name for b in resolve_blocks(sd.unet, "M0*")}


def test_custom_picker(sd):
    calls = []

    def last_candidate(deltas, candidates, step):
        calls.append((step, len(candidates), tuple(deltas.shape)))
        return len(candidates) - 1

    result = run_strategy(sd, BASE, blocks="U1*", picker=last_candidate)
    names = [b.name for b in resolve_blocks(sd.unet, "U1*")]
    assert result.order == names[::-1][:5]
    assert calls[0] == (0, 6, (6,)) and calls[1] == (1, 5, (5,))


def test_bad_strategy_input(sd):
    with pytest.raises(ValueError, match="unknown picker 'loudest'"):
        run_strategy(sd, BASE, blocks="U1*", picker="loudest")
    with pytest.raises(ValueError, match="at least one block"):
        run_strategy(sd, BASE, blocks=[])
    foreign = BASE.with_mods({"up_blocks.9.attentions.0.transformer_blocks.0.attn2": Schedule(2.0)})
    with pytest.raises(ValueError, match="unknown attention block"):
        generate(sd, foreign)  # a recipe from a model with other blocks


def test_a_non_finite_strategy_image_names_its_recipe_and_keeps_the_images_before_it(sd, tmp_path, monkeypatch):
    import attnmod.strategy as strategy_mod
    from attnmod.generate import NonFiniteImageError
    from attnmod.strategy import run_strategies

    real_render = strategy_mod.render

    def nan_for_seed_1(pipe, recipes):
        images = real_render(pipe, recipes)
        return images * np.nan if recipes[0].seed == 1 else images

    monkeypatch.setattr(strategy_mod, "render", nan_for_seed_1)
    bases = [Recipe("a red cat", seed=s, steps=2, guidance=5.0, width=32, height=32, model="tiny") for s in (0, 1)]
    with pytest.raises(NonFiniteImageError, match="seed 1, .*prompt 'a red cat'"):
        run_strategies(sd, bases, blocks="M0*", out=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000-seed0.png"]  # kept: a re-run resumes there
