"""Named sweep presets: the paper's standard scans and its ablation (Sec. 4)."""

from __future__ import annotations

from .schedule import Schedule

PRESETS: dict[str, dict] = {
    # Fig. 3: start -20..50 across, rate -1..1 down (SD1.5)
    "paper-scan": {"starts": (-20, -10, 0, 10, 20, 30, 40, 50), "rates": (-1.0, -0.5, 0.0, 0.5, 1.0)},
    # Fig. 11: SDXL is more sensitive to the rate, so -0.5..0.5
    "paper-scan-sdxl": {"starts": (-20, -10, 0, 10, 20, 30, 40, 50), "rates": (-0.5, -0.25, 0.0, 0.25, 0.5)},
    # Sec. 4: the tile with multiplier 0 and rate 0 (no prompt conditioning through the block) beside the default
    "zero-conditioning": {"settings": (Schedule(0.0, 0.0),)},
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
