"""The denoising step as explicit state, shared by every intervention that needs it."""

from __future__ import annotations

from contextvars import ContextVar

# True while a UNet call is made inside a step rather than by the sampling loop (a strategy's candidates, an fp16
# overflow redone in fp32): no clock counts it as a step.
EXTRA_CALL: ContextVar[bool] = ContextVar("attnmod_extra_unet_call", default=False)


class LoopClock:
    """Counts the UNet calls of a sampling loop; ``tick()`` once per call, from a UNet pre-forward hook.

    A new loop starts when the scheduler's ``timesteps`` tensor is a new object — every diffusers
    pipeline call runs ``scheduler.set_timesteps`` — so the step never depends on counting attention
    calls and two pipeline calls never run into each other. Without a scheduler, ``reset()`` starts a loop.

    ``scheduler_steps=True`` (DiT pipelines) takes the step from the scheduler's own ``step_index`` where it
    keeps one: FLUX's ``true_cfg_scale`` and SD3's skip-layer guidance call the transformer twice per step.
    """

    def __init__(self, owner=None, scheduler_steps: bool = False):
        self.owner = owner  # anything with a ``scheduler`` (a pipeline), or None
        self.scheduler_steps = scheduler_steps
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self._timesteps = None

    def tick(self) -> bool:
        """Advance to the next UNet call; True when it starts a new loop (then ``step`` is 0).

        A call made inside a step (``EXTRA_CALL`` set) keeps the step and returns False."""
        if EXTRA_CALL.get():
            return False
        scheduler = getattr(self.owner, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None and timesteps is not self._timesteps:
            self._timesteps, self.step = timesteps, 0
            return True
        if self.scheduler_steps and timesteps is not None and hasattr(scheduler, "step_index"):
            begin = getattr(scheduler, "begin_index", None) or 0  # img2img starts part-way
            index = scheduler.step_index
            self.step = 0 if index is None else index - begin
            return False
        self.step += 1
        return self.step == 0
