"""Images/min of a scan rendered locally vs on a local Ray with 1 and 2 workers (the Ray path's overhead).

    RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 python benchmarks/ray_scan.py    # needs attnmod[ray]; ~1 min

Tiny SD1.5 model, 32 tiles of 32x32, 3 steps, batch 4. Each executor is timed twice: the first scan includes
the workers loading the model, the second is warm.
"""

import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from attnmod import Recipe, Sweep, run_scan  # noqa: E402
from attnmod.distributed import RayExecutor  # noqa: E402
from attnmod.tiny import tiny_sd15  # noqa: E402

BASE = Recipe("a red cat", steps=3, guidance=5.0, width=32, height=32, model="tiny")
SWEEP = Sweep(prompts=("a red cat",), seeds=(0, 1, 2, 3), starts=(-5.0, 4.0, 8.0), rates=(0.5,))


def timed(pipe, executor, label: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        result = run_scan(pipe, SWEEP, BASE, out=out, batch_size=4, progress=False, executor=executor)
        dt = time.perf_counter() - t
    print(f"{label}: {result.rendered} images in {dt:.2f}s = {60 * result.rendered / dt:.0f} images/min", flush=True)


def main() -> None:
    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    timed(pipe, None, "local")
    timed(pipe, None, "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for n in (1, 2):
        with RayExecutor(workers=n) as ex:
            ex.start()
            timed(pipe, ex, f"ray, {n} worker(s), first scan (loads the model)")
            timed(pipe, ex, f"ray, {n} worker(s), warm")
    ray.shutdown()


if __name__ == "__main__":
    main()
