"""Images/min of a scan rendered locally vs on a local Ray with 1 and 2 workers, and the Ray path's per-tile overhead.

    RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 python benchmarks/ray_scan.py    # needs attnmod[ray]; ~2 min

Tiny SD1.5 model, 32 tiles of 32x32, 3 steps, batch 4, one torch thread everywhere (a Ray CPU worker's count).
Each executor is warmed up by one scan (the workers load the model), then timed ``REPEATS`` times; the fastest
run counts (the machine is shared). Printed:

* images/min: local, Ray with 1 worker, Ray with 2 workers;
* the per-tile overhead of the Ray path: a scan kept in memory, local vs Ray with 1 worker, interleaved (noisy on a
  shared machine); and, without rendering, the time to send recipes to a worker and get tiles back, per tile
  (batches of 1 and 4; 32x32 and SDXL's 1024x1024 float32 tiles, 12 MiB each, through this machine's object store);
* the driver writing one 1024x1024 tile PNG (it writes every tile, so its PNG encoding bounds a cluster's tiles/s)
  at zlib level 6 (the default) and 1 (``--png-compression 1``), side by side, with the file sizes.
"""

import os
import tempfile
import time
from functools import partial

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from attnmod import Recipe, Sweep, run_scan  # noqa: E402
from attnmod.distributed import RayExecutor  # noqa: E402
from attnmod.recipe import save_png  # noqa: E402
from attnmod.tiny import tiny_sd15  # noqa: E402

BASE = Recipe("a red cat", steps=3, guidance=5.0, width=32, height=32, model="tiny")
SWEEP = Sweep(prompts=("a red cat",), seeds=(0, 1, 2, 3), starts=(-5.0, 4.0, 8.0), rates=(0.5,))
REPEATS = 3
BIG = 1024  # SDXL's tile side


def scan_seconds(pipe, executor, write: bool = True) -> tuple[float, int]:
    """Fastest of ``REPEATS`` scans into fresh folders (``write``) or kept in memory: (seconds, tiles)."""
    best = float("inf")
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            result = run_scan(pipe, SWEEP, BASE, out=out if write else None, batch_size=4, progress=False,
                              executor=executor)
            best = min(best, time.perf_counter() - t)
    return best, result.rendered


def blank_tiles(pipe, recipes, side: int = 32):
    """A worker's answer of ``side``x``side`` float32 tiles, without rendering them: what Ray adds to a batch."""
    return np.full((len(recipes), side, side, 3), 0.5, dtype=np.float32)


def dispatch_ms(executor, side: int = 32, batch: int = 1, n: int = 48) -> float:
    """ms per tile of sending ``n`` batches to the workers and their ``side``-pixel tiles back, nothing rendered."""
    t = time.perf_counter()
    for _ in executor.map(None, [[BASE] * batch] * n, partial(blank_tiles, side=side)):
        pass
    return 1000 * (time.perf_counter() - t) / (n * batch)


def png_ms(image: Image.Image, level: int = 6, n: int = 5) -> tuple[float, int]:
    """(ms per write, bytes) of saving ``image`` as a tile PNG with its recipe at zlib ``level``."""
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        for i in range(n):
            path = save_png(image, f"{out}/{i}.png", BASE, compress_level=level)
        return 1000 * (time.perf_counter() - t) / n, path.stat().st_size


def main() -> None:
    torch.set_num_threads(1)
    pipe = tiny_sd15()
    pipe.set_progress_bar_config(disable=True)
    scan_seconds(pipe, None)  # warm-up
    local, tiles = scan_seconds(pipe, None)
    print(f"local: {tiles} images in {local:.2f}s = {60 * tiles / local:.0f} images/min", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    seconds = {}
    for n in (1, 2):
        with RayExecutor(workers=n) as ex:
            ex.start()
            scan_seconds(pipe, ex)  # warm-up: the workers load the model
            seconds[n], _ = scan_seconds(pipe, ex)
            print(f"ray, {n} worker(s), warm: {tiles} images in {seconds[n]:.2f}s = "
                  f"{60 * tiles / seconds[n]:.0f} images/min", flush=True)
            if n == 1:
                local_ab, ray_ab = float("inf"), float("inf")
                for _ in range(REPEATS):  # interleaved, tiles kept in memory (with a folder Ray's driver writes
                    local_ab = min(local_ab, scan_seconds(pipe, None, write=False)[0])  # while the worker renders)
                    ray_ab = min(ray_ab, scan_seconds(pipe, ex, write=False)[0])
                print(f"scan in memory, local vs Ray with 1 worker ({tiles} tiles of 32x32, one thread each): "
                      f"{local_ab:.2f}s vs {ray_ab:.2f}s = {1000 * (ray_ab - local_ab) / tiles:+.1f} ms per tile",
                      flush=True)
                print("per-tile overhead of the Ray path, nothing rendered (send the recipes, get 32x32 tiles back): "
                      f"{dispatch_ms(ex, 32, 1):.1f} ms in batches of 1, {dispatch_ms(ex, 32, 4):.1f} ms in "
                      "batches of 4", flush=True)
                print(f"the same with {BIG}x{BIG} float32 tiles (12 MiB each, this machine's object store): "
                      f"{dispatch_ms(ex, BIG, 1, 24):.1f} ms per tile", flush=True)
    ray.shutdown()
    tile = run_scan(pipe, Sweep(prompts=("a red cat",)), BASE, progress=False).images[0]
    smooth = tile.resize((BIG, BIG), Image.BICUBIC)  # an image's smooth areas compress; noise is the worst case
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (BIG, BIG, 3), dtype=np.uint8))
    for name, image in (("smooth image", smooth), ("noise", noise)):
        (ms6, size6), (ms1, size1) = png_ms(image, 6), png_ms(image, 1)
        print(f"driver writing one {BIG}x{BIG} tile PNG ({name}): {ms6:.0f} ms, {size6 / 1e3:.0f} kB at level 6; "
              f"{ms1:.0f} ms, {size1 / 1e3:.0f} kB at level 1 (x{ms6 / ms1:.2f} faster)", flush=True)


if __name__ == "__main__":
    main()
