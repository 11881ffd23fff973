"""What the page serves: one loaded model, its blocks, the folder results go to, and the job queue."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from ..blocks import downsampling, list_blocks
from ..defaults import model_defaults
from ..dit import default_block, denoiser, is_dit
from ..loading import DEFAULT_MODEL, EMBEDDED, load_pipeline
from .jobs import JobQueue


@dataclass
class Session:
    pipe: object
    model: str
    out_dir: Path
    queue: JobQueue = field(init=False)
    ranks: dict[str, int] = field(default_factory=dict)  # short block name -> influence rank, once computed
    executor: object | None = None  # attnmod ui --ray: a RayExecutor the scans (and influence, strategy) share
    _numbers: itertools.count = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.queue = JobQueue(self.pipe)
        self.blocks = list_blocks(self.pipe)
        self.short_names = {b.name: b.short for b in self.blocks}
        self.defaults = model_defaults(self.pipe)
        if is_dit(self.pipe):  # SD3 / FLUX: every block sees the same token grid
            self.resolution = dict.fromkeys((b.short for b in self.blocks), None)
        else:
            latent = denoiser(self.pipe).config.sample_size
            factors = downsampling(self.pipe)
            self.resolution = {b.short: latent // factors[b.name] if b.name in factors else None
                               for b in self.blocks}

    @classmethod
    def load(cls, model: str | None, out_dir: str | Path, device=None, dtype=None, **speed) -> Session:
        """``speed``: ``compile``, ``offload``, ``vae_tiling`` for ``load_pipeline``."""
        model = model or DEFAULT_MODEL
        return cls(load_pipeline(model, device=device, dtype=dtype, **speed), model, Path(out_dir))

    @property
    def default_block(self) -> str:
        """The block the scan tab starts with: the embedded model's most telling one (README), else the paper's."""
        if self.model in EMBEDDED and "U2A2A2" in self.resolution:
            return "U2A2A2"
        return default_block(self.pipe)  # U1A1A2, or a DiT model's middle joint block

    def block_choices(self) -> list[tuple[str, str]]:
        """(label, short name) per block: resolution, self/cross, and the influence rank once computed."""
        out = []
        for b in self.blocks:
            res = self.resolution[b.short]
            label = f"{b.short} · {f'{res}×{res} · ' if res else ''}{b.kind}"
            if b.short in self.ranks:
                label += f" · rank {self.ranks[b.short]}"
            out.append((label, b.short))
        if self.ranks:
            out.sort(key=lambda c: self.ranks.get(c[1], 10**6))
        return out

    def new_folder(self, kind: str) -> Path:
        """A fresh output folder for a job that does not resume (``<out>/<kind>-<n>``)."""
        while True:
            path = self.out_dir / f"{kind}-{next(self._numbers):03d}"
            if not path.exists():
                return path
