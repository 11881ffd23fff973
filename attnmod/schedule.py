"""Per-step attention multipliers: the AttnMod paper's constant and accelerating rates, or a list.

Step ``i`` is the ``i``-th UNet call of a denoising loop (0-based), as in the authors' reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """The attention multiplier of one block over the denoising loop.

    * constant rate (paper, Fig. 3):   ``m_i = start + rate * i``
    * variable rate (paper, Fig. 7):   ``rate_i = rate + accel * i``; ``m_0 = start``, ``m_{i+1} = m_i + rate_i``
    * explicit list:                   ``m_i = values[i]`` (its length must equal the loop's UNet calls)

    The defaults (1.0, 0, 0) mean no change.
    """

    start: float = 1.0
    rate: float = 0.0
    accel: float = 0.0
    values: tuple[float, ...] | None = None

    def __post_init__(self):
        for field in ("start", "rate", "accel"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"Schedule.{field} must be a finite number, got {value!r}")
            object.__setattr__(self, field, float(value))
        if self.values is not None:
            values = tuple(float(v) for v in self.values)
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError("Schedule.values must be a non-empty list of finite numbers")
            if (self.start, self.rate, self.accel) != (1.0, 0.0, 0.0):
                raise ValueError("give either Schedule.values or start/rate/accel, not both")
            object.__setattr__(self, "values", values)

    @property
    def is_neutral(self) -> bool:
        """True when every step's multiplier is 1.0 whatever the step count."""
        if self.values is not None:
            return all(v == 1.0 for v in self.values)
        return (self.start, self.rate, self.accel) == (1.0, 0.0, 0.0)

    def compile(self, num_steps: int) -> np.ndarray:
        """Multipliers for steps ``0 .. num_steps-1`` as a float64 array of shape (num_steps,)."""
        if self.values is not None:
            if len(self.values) != num_steps:
                raise ValueError(
                    f"schedule lists {len(self.values)} multipliers but this loop makes {num_steps} UNet calls"
                )
            return np.asarray(self.values, dtype=np.float64)
        i = np.arange(num_steps, dtype=np.float64)
        # sum_{j<i} (rate + accel*j) = rate*i + accel*i(i-1)/2
        return self.start + self.rate * i + self.accel * i * (i - 1) / 2

    def to_text(self) -> str:
        """The CLI form: ``START[:RATE[:ACCEL]]`` or ``[v0,v1,...]``; ``parse`` reads it back."""
        if self.values is not None:
            return "[" + ",".join(_num(v) for v in self.values) + "]"
        parts = [_num(self.start), _num(self.rate)] + ([_num(self.accel)] if self.accel else [])
        return ":".join(parts)

    def to_dict(self) -> dict:
        if self.values is not None:
            return {"values": list(self.values)}
        return {"start": self.start, "rate": self.rate, "accel": self.accel}

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        if "values" in d:
            return cls(values=tuple(d["values"]))
        return cls(d.get("start", 1.0), d.get("rate", 0.0), d.get("accel", 0.0))

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """``"-5"``, ``"-5:0.2"``, ``"-5:0.2:0.01"`` or ``"[1,0.5,0.25]"`` -> Schedule."""
        text = text.strip()
        try:
            if text.startswith("["):
                if not text.endswith("]"):
                    raise ValueError
                return cls(values=tuple(float(v) for v in text[1:-1].split(",")))
            nums = [float(v) for v in text.split(":")]
            if not 1 <= len(nums) <= 3:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"malformed schedule {text!r}: expected START[:RATE[:ACCEL]] (e.g. -5:0.2) or [m0,m1,...]"
            ) from None
        return cls(*nums)


def _num(v: float) -> str:
    return f"{v:g}"


def as_schedule(value) -> Schedule:
    """Accept a Schedule, a number (constant multiplier), a ``(start, rate[, accel])`` tuple or text."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        return Schedule.parse(value)
    if isinstance(value, int | float):
        return Schedule(start=value)
    if isinstance(value, tuple | list):
        return Schedule(*value)
    raise TypeError(f"cannot make a Schedule from {value!r}")
