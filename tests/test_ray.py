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
def ray_session():
    """One local Ray for the module, with 4 CPU slots: the shared executor's 2 workers plus up to 2 more for a
    test's own executor (the CLI's, the killed-worker test's), which frees them on exit; so the tests pass in
    any order."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def executor(ray_session):
    with RayExecutor(workers=2) as ex:
        yield ex


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
def test_workers_the_cluster_cannot_place_are_one_line_not_a_hang(ray_session):
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
def test_a_refused_connection_names_token_authentication(monkeypatch):
    """Ray >= 2.59 turns token authentication on for clusters started where a token exists; a driver given an
    explicit address (not auto) connects only with RAY_AUTH_MODE=token, else Ray says just 'Failed to connect'."""
    def refuse(**kw):
        raise ConnectionError("Failed to connect to Ray cluster")

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(ValueError, match=f"cannot reach the Ray cluster at {address}: Failed to connect to Ray "
                                             "cluster; if the cluster uses token authentication, set RAY_AUTH_MODE=token"):
            RayExecutor(address=address, workers=1).start()


def test_ray_client_address_without_the_client_extra_is_one_line(monkeypatch):
    from attnmod.distributed import check_reachable

    monkeypatch.setitem(sys.modules, "grpc", None)  # the minimal Ray: no Ray Client
    with pytest.raises(ValueError, match=r'ray://127.0.0.1:1 is a Ray Client address: it needs pip install "ray\[client\]"'):
        check_reachable("ray://127.0.0.1:1")


@needs_ray
def test_killed_worker_loses_only_its_batch(sd, ray_session, tmp_path):
    with RayExecutor(workers=2) as executor:  # its own: the kill leaves it one worker
        executor.start()
        assert len(executor.actors) == 2

        def kill_one(done, total):
            if done == 1:
                ray.kill(executor.actors[0])  # a real kill: the process ends with a batch in flight

        result = run_scan(sd, SWEEP, BASE, out=tmp_path, batch_size=1, progress=kill_one, executor=executor)
        assert len(executor.actors) == 1
    assert executor.actors == ()  # closed on exit: its CPU slots are free again
    assert result.rendered == 12 and not result.failed
    assert len(list((tmp_path / "tiles").glob("*.png"))) == 12
    assert all(t["status"] == "done" for t in _manifest(tmp_path)["tiles"])


@needs_ray
def test_cli_scan_on_ray_equals_local(ray_session, tmp_path, capsys):
    args = ["scan", "--model", "tiny", "--prompt", "a red cat", "--seed", "0,1", "--start", "-5", "--rate", "0.5",
            "--steps", "2", "--size", "32x32", "--batch-size", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "1"]) == 0
    assert "rendered 8 of 8 images" in capsys.readouterr().out
    here, there = _pixels(tmp_path / "local"), _pixels(tmp_path / "ray")
    assert len(here) == 8 and all(np.array_equal(here[k], there[k]) for k in here) and here.keys() == there.keys()
    assert _manifest(tmp_path / "ray") == _manifest(tmp_path / "local")


@needs_ray
def test_workers_with_another_attnmod_version_are_refused(ray_session, monkeypatch):
    import re

    import attnmod

    workers = attnmod.__version__
    monkeypatch.setattr(attnmod, "__version__", "0.0.0-driver")
    ex = RayExecutor(workers=1)
    with pytest.raises(ValueError, match=re.escape(f"Ray workers run attnmod {workers}, this driver 0.0.0-driver")):
        ex.start()
    assert ex.actors == ()


@needs_ray
def test_influence_map_on_ray_equals_local(ray_session, tmp_path, capsys):
    args = ["influence", "--model", "tiny", "--prompt", "a red cat", "--blocks", "U1*", "--setting", "-5:0.2",
            "--steps", "2", "--size", "32x32", "--batch-size", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "1"]) == 0
    capsys.readouterr()
    for name in ("influence.json", "manifest.json"):
        assert json.loads((tmp_path / "ray" / name).read_text()) == json.loads((tmp_path / "local" / name).read_text())
    here, there = _pixels(tmp_path / "local"), _pixels(tmp_path / "ray")
    assert len(here) > 2 and here.keys() == there.keys() and all(np.array_equal(here[k], there[k]) for k in here)


SWEEPS = {  # as attnmod scan reads them: the paper's seed sweep (Fig. 4: rows seeds, columns settings) and
    # style sweep (Fig. 5: one prompt per style); the CLI's --ray builds the same executor (test above)
    "seeds": dict(prompts=["a red cat"], seed="0,1,2", settings=["-5:0.2", "4:-0.5"]),
    "styles": dict(prompts=["a red cat, van Gogh", "a red cat, Ukiyo-e"], settings=["-5:0.2"]),
}


@needs_ray
@pytest.mark.parametrize("kind", SWEEPS)
def test_seed_and_style_sweeps_on_ray_equal_local(kind, sd, executor, tmp_path):
    from attnmod.jobs import scan_sweep

    sweep = scan_sweep(**SWEEPS[kind])
    local = run_scan(sd, sweep, BASE, out=tmp_path / "local", batch_size=2, progress=False)
    run_scan(sd, sweep, BASE, out=tmp_path / "ray", batch_size=2, progress=False, executor=executor)
    here, there = _pixels(tmp_path / "local"), _pixels(tmp_path / "ray")
    assert len(here) == (9 if kind == "seeds" else 4) and here.keys() == there.keys()
    assert all(np.array_equal(here[k], there[k]) for k in here)
    assert _manifest(tmp_path / "ray") == _manifest(tmp_path / "local")
    assert _manifest(tmp_path / "ray")["layout"]["y"] == ("seed" if kind == "seeds" else "prompt")
    for grid in local.sheet_files:
        assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(tmp_path / "ray" / grid.name)))


@needs_ray
def test_strategies_sharded_on_ray_equal_local_and_resume(ray_session, tmp_path, capsys):
    from attnmod.recipe import png_text

    args = ["strategy", "--model", "tiny", "--prompt", "a red cat", "--prompt", "a blue dog", "--seed", "0,1",
            "--blocks", "M0*", "--steps", "2", "--size", "32x32", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2"]) == 0
    assert "wrote 4 strategies" in capsys.readouterr().out
    local, sharded = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("local", "ray"))
    assert local == sharded
    assert [n for n in local if n.endswith(".png")] == ["000-seed0.png", "001-seed1.png", "002-seed0.png",
                                                          "003-seed1.png"]
    for name in local:
        a, b = tmp_path / "local" / name, tmp_path / "ray" / name
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
            assert png_text(a) == png_text(b)  # recipe, parameters and the attnmod_strategy chunk (block order)
    assert json.loads((tmp_path / "ray" / "strategies.json").read_text()) == \
        json.loads((tmp_path / "local" / "strategies.json").read_text())
    assert main([*args, "--out", str(tmp_path / "one.png")]) == 2  # several images: a folder, not a PNG
    assert "make one image each: --out names a folder" in capsys.readouterr().err
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").glob("*.png")}
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "1"]) == 0  # resumes: none redone
    assert all(p.stat().st_mtime_ns == t for p, t in files.items())


@needs_ray
def test_web_page_scans_and_influence_maps_run_on_the_pages_executor(executor, tmp_path, capsys, monkeypatch):
    """attnmod ui --ray: the scan tab's run and the influence tab's command render on the page's executor (left
    open for the next job) and write what the CLI writes locally."""
    pytest.importorskip("gradio")
    import inspect

    batches = []
    sharded = executor.map
    monkeypatch.setattr(executor, "map", lambda pipe, b, work=None: (batches.append(len(b)), sharded(pipe, b, work))[1])

    from attnmod import ui
    from attnmod.ui import commands

    demo, session = ui.create("tiny", tmp_path / "page", executor=executor)
    try:
        run = next(f.fn for f in demo.fns.values()
                   if f.name == "run" and "rate" in inspect.signature(f.fn).parameters)
        *_, last = run("a red cat", "", "0,1", "2", "", "32x32", ["U1A1A2"], False, "-5", "0.5", "",
                       str(tmp_path / "ray"), None)
        assert "rendered 8 of 8 images" in str(last)
        influence = ["influence", "--model", "tiny", "--prompt", "a red cat", "--blocks", "U1*", "--steps", "2",
                     "--size", "32x32", "--batch-size", "3"]
        commands.run(commands.parse([*influence, "--out", str(tmp_path / "ray-influence")]), session.pipe,
                     session.executor)
    finally:
        demo.close()
        session.queue.close()
    assert len(batches) == 2 and len(executor.actors) == 2  # both jobs went to the workers, which stay up
    assert main(["scan", "--model", "tiny", "--prompt", "a red cat", "--seed", "0,1", "--block", "U1A1A2", "--start",
                 "-5", "--rate", "0.5", "--steps", "2", "--size", "32x32", "--quiet",
                 "--out", str(tmp_path / "local")]) == 0
    assert main([*influence, "--quiet", "--out", str(tmp_path / "local-influence")]) == 0
    capsys.readouterr()
    for ours, theirs in (("ray", "local"), ("ray-influence", "local-influence")):
        here, there = _pixels(tmp_path / theirs), _pixels(tmp_path / ours)
        assert len(here) > 2 and here.keys() == there.keys() and all(np.array_equal(here[k], there[k]) for k in here)
    assert json.loads((tmp_path / "ray-influence" / "influence.json").read_text()) == \
        json.loads((tmp_path / "local-influence" / "influence.json").read_text())


def test_web_page_with_an_unreachable_ray_address_is_one_line_before_loading(tmp_path, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["ui", "--model", "tiny", "--out", str(tmp_path / "page"), "--ray", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnmod ui: error: cannot reach the Ray cluster at 127.0.0.1:{port}") and err.count("\n") == 1
