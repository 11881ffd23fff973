"""Scans on a Ray cluster: ``run_scan(..., executor=RayExecutor(...))``.

The driver plans the tiles, resumes from the output folder and writes every tile, the manifest and the
sheets exactly as a local scan does (``attnmod.sweep``); only the rendering of the batches moves to a pool
of Ray actors, each holding the pipeline loaded once (by the recipes' model reference: ``tiny``, a folder,
a hub id). Batches carry their index and come back in any order. A worker that dies loses only its
in-flight batch, which goes to another worker. Ray is imported here only, when an executor is made.

An executor's ``map(pipe, batches, work)`` runs ``work(pipe, recipes)`` (default ``generate.render``) on
every batch: scans and influence maps render tiles, ``strategy.run_strategies`` runs one greedy search per
recipe; both go through the same executors.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .recipe import Recipe

INSTALL_HINT = 'Ray is not installed: pip install "attnmod[ray]"'


def require_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A ``HOST:PORT`` or ``ray://HOST:PORT`` address must accept a connection (Ray itself would retry for
    minutes), and ``ray://`` needs Ray Client's extra packages; ``None`` and ``auto`` are left to Ray."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"malformed Ray address {address!r}: use HOST:PORT, ray://HOST:PORT or auto")
    if address.startswith("ray://"):
        try:
            import grpc  # noqa: F401 - what Ray Client needs beyond the minimal Ray
        except ImportError:
            raise ValueError(f'{address} is a Ray Client address: it needs pip install "ray[client]" here (the '
                             "same Ray and Python versions as the cluster)") from None
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: ray.init() on this machine (unless Ray is already initialised)
    workers: int = 2  # actors, one per GPU (or CPU slot)
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    start_timeout: float = 120  # seconds for every worker to start (the cluster may lack the resources)

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError("Ray workers must be >= 1")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ValueError("GPUs and CPUs per Ray worker must be >= 0")


class RenderWorker:
    """A Ray actor's state: one pipeline, loaded on first use, kept for every later batch."""

    def __init__(self):
        self.pipe = None
        self.spec = None

    def hello(self) -> str:
        from . import __version__

        return __version__

    def load(self, spec: tuple[str, str, str, str]) -> None:
        if spec == self.spec:
            return
        from .loading import load_pipeline

        model, scheduler, device, dtype = spec
        try:
            pipe = load_pipeline(model, device=device or None, dtype=dtype or None)
        except Exception as e:  # noqa: BLE001 - the reason travels back to the driver in one line
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"a Ray worker cannot load the model {model!r}: {reason}") from None
        if scheduler and type(pipe.scheduler).__name__ != scheduler:
            import diffusers

            pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.spec = pipe, spec

    def run(self, index: int, recipes: list[dict], work: Callable | None = None) -> tuple[int, Any]:
        """``(index, work(pipe, recipes))``; ``work`` defaults to rendering the recipes' images."""
        from .generate import render

        batch = [Recipe.from_dict(r) for r in recipes]
        self.load(_spec(batch[0]))
        return index, (work or render)(self.pipe, batch)


def _spec(recipe: Recipe) -> tuple[str, str, str, str]:
    """What a worker loads for ``recipe``: model, scheduler class, device type, dtype."""
    return recipe.model, recipe.scheduler, recipe.device.split(":")[0], recipe.dtype


class RayExecutor:
    """Renders a scan's batches on ``workers`` Ray actors (see the module doc); ``close()`` (or leaving a
    ``with`` block) ends them, and shuts Ray down if this executor started it, so the CPU/GPU slots they
    held are free for the next executor."""

    def __init__(self, address: str | None = None, workers: int = 2, gpus_per_worker: float = 0,
                 cpus_per_worker: float = 1, start_timeout: float = 120):
        self.options = RayOptions(address, workers, gpus_per_worker, cpus_per_worker, start_timeout)
        self._ray = require_ray()
        self._actors: list = []
        self._owns_ray = False  # True when start() called ray.init(): close() then calls ray.shutdown()

    @property
    def actors(self) -> tuple:
        """The live actors' handles (started by the first ``map``)."""
        return tuple(self._actors)

    def start(self) -> None:
        ray, o = self._ray, self.options
        if not ray.is_initialized():
            check_reachable(o.address)
            try:
                ray.init(address=o.address, include_dashboard=False, log_to_driver=False)
                self._owns_ray = True
            except ConnectionError as e:
                hint = ""
                if o.address not in (None, "auto") and "RAY_AUTH_MODE" not in os.environ:
                    hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token and this machine's "
                            "token (~/.ray/auth_token or RAY_AUTH_TOKEN): Ray enables it for --ray auto only")
                raise ValueError(f"cannot reach the Ray cluster at {o.address}: {' '.join(str(e).split())}{hint}") \
                    from None
        if self._actors:
            return
        actor = ray.remote(RenderWorker).options(num_cpus=o.cpus_per_worker, num_gpus=o.gpus_per_worker,
                                                 max_restarts=0)
        self._actors = [actor.remote() for _ in range(o.workers)]
        from . import __version__

        try:
            versions = self._get([a.hello.remote() for a in self._actors], timeout=o.start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ValueError(f"Ray could not start {o.workers} worker(s) with {o.cpus_per_worker:g} CPU(s) and "
                             f"{o.gpus_per_worker:g} GPU(s) each within {o.start_timeout:g} s; the cluster has "
                             f"{ray.available_resources()}") from None
        if any(v != __version__ for v in versions):
            self.close()
            raise ValueError(f"Ray workers run attnmod {', '.join(sorted(set(versions)))}, this driver {__version__}; "
                             "install the same version everywhere")

    def map(self, pipe, batches: Sequence[Sequence[Recipe]],
            work: Callable | None = None) -> Iterator[tuple[int, np.ndarray | Any]]:
        """``(batch index, images)`` for every batch as it finishes, in any order; with ``work`` (a function
        of ``(pipe, recipes)`` that pickles), ``(batch index, work's result)``, run on the workers."""
        ray = self._ray
        if not batches:
            return
        self.start()
        specs = {_spec(b[0]) for b in batches}
        self._get([a.load.remote(s) for a in self._actors for s in specs])  # load (and fail) before any tile
        queue = list(range(len(batches)))[::-1]
        payload = [[r.to_dict() for r in b] for b in batches]
        running: dict = {}  # object ref -> (actor, batch index)

        def feed(actor) -> None:
            if queue:
                index = queue.pop()
                running[actor.run.remote(index, payload[index], work)] = (actor, index)

        for actor in self._actors:
            feed(actor)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, index = running.pop(ref)
            try:
                got, images = self._get(ref)
            except ray.exceptions.RayActorError:  # the worker died: its batch goes to another one
                self._actors.remove(actor)
                queue.append(index)
                if not self._actors:
                    raise RuntimeError("every Ray worker died; re-run the scan to resume it") from None
                idle = [a for a in self._actors if a not in {v[0] for v in running.values()}]
                for a in idle:
                    feed(a)
                continue
            feed(actor)  # keep the worker busy while the driver writes this batch
            yield got, images

    def _get(self, refs, timeout: float | None = None):
        """``ray.get``, with a worker's ``ValueError`` raised here as itself (one line, no remote traceback)."""
        try:
            return self._ray.get(refs, timeout=timeout)
        except self._ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise ValueError(str(e.cause)) from None
            raise

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
