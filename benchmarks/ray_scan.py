"""Images/min of a scan rendered locally vs on a local Ray with 1 and 2 workers, and the Ray path's per-tile overhead.

    RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 python benchmarks/ray_scan.py    # needs attnmod[ray]; ~2 min

Tiny SD1.5 model, 32 tiles of 32x32, 3 steps, batch 4, one torch thread everywhere (a Ray CPU worker's count).
Each executor is warmed up by one scan (the workers load the model), then timed ``REPEATS`` times; the fastest
run counts (the machine is shared). Printed:

* images/min: local, Ray with 1 worker, Ray with 2 workers;
* the per-tile overhead of the Ray path: (Ray with 1 worker - local) / tiles, the same tiles on the same thread count;
* what grows with the tile size at SDXL's 1024x1024: moving one tile's pixels (float32, 12 MiB) from a worker to the
  driver through Ray's object store on this machine, and the driver writing one 1024x1024 tile PNG (it writes every
  tile, so its PNG encoding bounds a cluster's tiles/s).
"""

import os
import tempfile
import time

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


def scan_seconds(pipe, executor) -> tuple[float, int]:
    """Fastest of ``REPEATS`` scans into fresh folders: (seconds, tiles)."""
    best = float("inf")
    for _ in range(REPEATS):
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            result = run_scan(pipe, SWEEP, BASE, out=out, batch_size=4, progress=False, executor=executor)
            best = min(best, time.perf_counter() - t)
    return best, result.rendered


def big_tiles(pipe, recipes):
    """A worker's answer of 1024x1024 float32 tiles (the size of SDXL's), without rendering them."""
    return np.full((len(recipes), BIG, BIG, 3), 0.5, dtype=np.float32)


def transfer_ms(executor, n: int = 24) -> float:
    """ms per 1024x1024 tile moved from a worker to the driver (batches of one, one worker)."""
    t = time.perf_counter()
    for _ in executor.map(None, [[BASE]] * n, big_tiles):
        pass
    return 1000 * (time.perf_counter() - t) / n


def png_ms(image: Image.Image, n: int = 5) -> float:
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        for i in range(n):
            save_png(image, f"{out}/{i}.png", BASE)
        return 1000 * (time.perf_counter() - t) / n


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
                print(f"per-tile overhead of the Ray path (1 worker - local, {tiles} tiles of 32x32): "
                      f"{1000 * (seconds[1] - local) / tiles:+.1f} ms", flush=True)
                print(f"moving one {BIG}x{BIG} float32 tile from a worker to the driver (this machine): "
                      f"{transfer_ms(ex):.1f} ms", flush=True)
    ray.shutdown()
    tile = run_scan(pipe, Sweep(prompts=("a red cat",)), BASE, progress=False).images[0]
    smooth = tile.resize((BIG, BIG), Image.BICUBIC)  # an image's smooth areas compress; noise is the worst case
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (BIG, BIG, 3), dtype=np.uint8))
    print(f"driver writing one {BIG}x{BIG} tile PNG: {png_ms(smooth):.0f} ms (smooth image), "
          f"{png_ms(noise):.0f} ms (noise)", flush=True)


if __name__ == "__main__":
    main()
