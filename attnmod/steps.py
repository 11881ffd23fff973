"""The denoising step as explicit state, shared by every intervention that needs it."""

from __future__ import annotations


class LoopClock:
    """Counts the UNet calls of a sampling loop; ``tick()`` once per call, from a UNet pre-forward hook.

    A new loop starts when the scheduler's ``timesteps`` tensor is a new object — every diffusers
    pipeline call runs ``scheduler.set_timesteps`` — so the step never depends on counting attention
    calls and two pipeline calls never run into each other. Without a scheduler, ``reset()`` starts a loop.
    """

    def __init__(self, owner=None):
        self.owner = owner  # anything with a ``scheduler`` (a pipeline), or None
        self.reset()

    def reset(self) -> None:
        self.step = -1
        self._timesteps = None

    def tick(self) -> bool:
        """Advance to the next UNet call; True when it starts a new loop (then ``step`` is 0)."""
        timesteps = getattr(getattr(self.owner, "scheduler", None), "timesteps", None)
        if timesteps is not None and timesteps is not self._timesteps:
            self._timesteps, self.step = timesteps, 0
            return True
        self.step += 1
        return self.step == 0
