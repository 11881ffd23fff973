"""Scans on Ray (attnmod.distributed): local Ray, 2 CPU workers, the tiny model, 2 steps."""

import json
import os
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from attnmod import Recipe, Sweep, run_scan
from attnmod.cli import main
from attnmod.distributed import RayExecutor

try:
    import ray
except ImportError:
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason='Ray is not installed (pip install "attnmod[ray]")')

BASE = Recipe("a red cat", steps=2, guidance=5.0, width=32, height=32, model="tiny")
SWEEP = Sweep(prompts=("a red cat",), seeds=(0, 1), starts=(-5.0, 4.0), rates=(0.5,))  # 3 x 2 x 2 = 12 tiles


def test_scan_without_ray_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    out = tmp_path / "scan"
    code = main(["scan", "--model", "tiny", "--prompt", "a red cat", "--steps", "2", "--size", "32x32",
                 "--start", "-5", "--rate", "0.5", "--out", str(out), "--quiet", "--ray"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == 'attnmod scan: error: Ray is not installed: pip install "attnmod[ray]"'
    assert not out.exists()


@pytest.fixture(scope="module")
def executor():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ex = RayExecutor(workers=2)
    yield ex
    ex.close()
    ray.shutdown()



@pytest.fixture(autouse=True)
def one_thread():
    """The local runs compared with Ray's use one thread, as the Ray workers (one CPU each): byte-identical tiles
    need the same thread count (the matrix products' blocking depends on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "tiles").glob("*.png"))}


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


@needs_ray
def test_sharded_scan_equals_local_scan(sd, executor, tmp_path):
    local = run_scan(sd, SWEEP, BASE, out=tmp_path / "local", batch_size=2, progress=False)
    sharded = run_scan(sd, SWEEP, BASE, out=tmp_path / "ray", batch_size=2, progress=False, executor=executor)
    assert sharded.rendered == local.rendered == 12 and not sharded.failed
    here, there = _pixels(tmp_path / "local"), _pixels(tmp_path / "ray")
    assert len(here) == 12 and here.keys() == there.keys()
    assert all(np.array_equal(here[k], there[k]) for k in here)
    for name in here:  # the recipe embedded in each tile too
        assert Recipe.from_png(tmp_path / "ray" / "tiles" / name) == Recipe.from_png(tmp_path / "local" / "tiles" / name)
    assert _manifest(tmp_path / "ray") == _manifest(tmp_path / "local")
    for grid in local.sheet_files:
        assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(tmp_path / "ray" / grid.name)))
    assert not list((tmp_path / "ray").rglob(".*.tmp"))


@needs_ray
def test_interrupted_driver_resumes_without_recomputing(sd, executor, tmp_path):
    def interrupt(done, total):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scan(sd, SWEEP, BASE, out=tmp_path, batch_size=2, progress=interrupt, executor=executor)
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "tiles").glob("*.png")}
    assert len(finished) == 4
    assert not list(tmp_path.glob("tiles/.*.tmp"))
    result = run_scan(sd, SWEEP, BASE, out=tmp_path, batch_size=2, progress=False, executor=executor)
    assert result.pending_count == 8 and result.rendered == 8
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert all(t["status"] == "done" for t in _manifest(tmp_path)["tiles"])
    again = run_scan(sd, SWEEP, BASE, out=tmp_path, batch_size=2, progress=False, executor=executor)
    assert again.pending_count == 0


@needs_ray
def test_workers_without_the_model_fail_before_any_tile(sd, executor, tmp_path):
    missing = Recipe("a red cat", steps=2, guidance=5.0, width=32, height=32, model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="cannot load the model"):
        run_scan(sd, SWEEP, missing, out=tmp_path / "out", batch_size=2, progress=False, executor=executor)
    assert not list((tmp_path / "out").glob("tiles/*.png"))


@needs_ray
def test_workers_the_cluster_cannot_place_are_one_line_not_a_hang(executor):
    ex = RayExecutor(workers=1, cpus_per_worker=64, start_timeout=2)
    with pytest.raises(ValueError, match=r"Ray could not start 1 worker\(s\) with 64 CPU\(s\) and 0 GPU\(s\) each within 2 s"):
        ex.start()
    assert ex.actors == ()


@needs_ray
def test_options_are_checked():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        RayExecutor(workers=0)


def test_unreachable_or_malformed_address_is_one_line_at_once():
    from attnmod.distributed import check_reachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}: "):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="malformed Ray address"):
        check_reachable("headnode")
    check_reachable(None)
    check_reachable("auto")


@needs_ray
def test_killed_worker_loses_only_its_batch(sd, executor, tmp_path):  # last: it leaves one worker
    assert len(executor.actors) == 2

    def kill_one(done, total):
        if done == 1:
            ray.kill(executor.actors[0])  # a real kill: the process ends with a batch in flight

    result = run_scan(sd, SWEEP, BASE, out=tmp_path, batch_size=1, progress=kill_one, executor=executor)
    assert len(executor.actors) == 1
    assert result.rendered == 12 and not result.failed
    assert len(list((tmp_path / "tiles").glob("*.png"))) == 12
    assert all(t["status"] == "done" for t in _manifest(tmp_path)["tiles"])


@needs_ray
def test_cli_scan_on_ray_equals_local(executor, tmp_path, capsys):  # after the kill: one CPU slot is free
    args = ["scan", "--model", "tiny", "--prompt", "a red cat", "--seed", "0,1", "--start", "-5", "--rate", "0.5",
            "--steps", "2", "--size", "32x32", "--batch-size", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "1"]) == 0
    assert "rendered 8 of 8 images" in capsys.readouterr().out
    here, there = _pixels(tmp_path / "local"), _pixels(tmp_path / "ray")
    assert len(here) == 8 and all(np.array_equal(here[k], there[k]) for k in here) and here.keys() == there.keys()
    assert _manifest(tmp_path / "ray") == _manifest(tmp_path / "local")


@needs_ray
def test_workers_with_another_attnmod_version_are_refused(executor, monkeypatch):  # after the kill: a free slot
    import re

    import attnmod

    workers = attnmod.__version__
    monkeypatch.setattr(attnmod, "__version__", "0.0.0-driver")
    ex = RayExecutor(workers=1)
    with pytest.raises(ValueError, match=re.escape(f"Ray workers run attnmod {workers}, this driver 0.0.0-driver")):
        ex.start()
    assert ex.actors == ()


@needs_ray
def test_influence_map_on_ray_equals_local(executor, tmp_path, capsys):  # after the kill: a free slot
    args = ["influence", "--model", "tiny", "--prompt", "a red cat", "--blocks", "U1*", "--setting", "-5:0.2",
            "--steps", "2", "--size", "32x32", "--batch-size", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "1"]) == 0
    capsys.readouterr()
    for name in ("influence.json", "manifest.json"):
        assert json.loads((tmp_path / "ray" / name).read_text()) == json.loads((tmp_path / "local" / name).read_text())
    here, there = _pixels(tmp_path / "local"), _pixels(tmp_path / "ray")
    assert len(here) > 2 and here.keys() == there.keys() and all(np.array_equal(here[k], there[k]) for k in here)
