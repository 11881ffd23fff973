"""The library layer shared by the CLI and the web page: jobs.py, run_scan's on_tiles, grid.cell_box, and the
page's job queue (one job at a time, cancel at the next UNet call) — no browser, no Gradio needed."""

import sys
import threading
import time

import numpy as np
import pytest
from conftest import hook_count
from PIL import Image

from attnmod import Recipe, Schedule, Sweep, run_scan
from attnmod.cli import main
from attnmod.grid import cell_box, display_tile, make_grid
from attnmod.jobs import finer_range, mod_texts, parse_mods, scan_sweep
from attnmod.modify import normalize_mods

BASE = Recipe("a red cat", steps=2, guidance=5.0, width=32, height=32, model="tiny")


def test_finer_range_is_centred_on_the_tile_and_finer_than_the_axis():
    assert finer_range([-5, 1, 5], 5) == "1:9:5"  # neighbour 1 is 4 away: 5 ± 4 in steps of 2 (the axis: 4)
    assert finer_range([-20, -10, 0, 1, 10], -10, n=3) == "-20:0:3"
    values = np.linspace(*[float(v) for v in finer_range([0, 0.5, 1], 0.5, n=7).split(":")[:2]], 7)
    assert values[3] == pytest.approx(0.5) and values[1] - values[0] < 0.5
    assert finer_range([2.0], 2.0) == "1:3:5"  # one value: ± 1
    with pytest.raises(ValueError, match="not a value of the axis"):
        finer_range([1, 2], 3)
    with pytest.raises(ValueError, match="odd number"):
        finer_range([1, 2], 2, n=4)


def test_mods_round_trip_through_their_text(sd):
    short = {"up_blocks.1.attentions.1.transformer_blocks.0.attn2": "U1A1A2"}
    mods = normalize_mods(sd.unet, parse_mods(["U1A1A2=-5:0.2", " M0A0A1 = [1,0.5]"]))
    recipe = BASE.with_mods(mods)
    texts = mod_texts(recipe, short)
    assert "U1A1A2=-5:0.2" in texts and len(texts) == 2
    assert normalize_mods(sd.unet, parse_mods(texts)) == recipe.mods_dict
    with pytest.raises(ValueError, match="--mod expects BLOCK=START"):
        parse_mods(["U1A1A2"])


def test_scan_sweep_reads_the_cli_options_and_names_the_bad_one():
    sweep = scan_sweep(["p"], seed="0:2:3", blocks=["U1A1A2"], start="-5,5", rate="0.5")
    assert sweep.seeds == (0, 1, 2) and sweep.starts == (-5.0, 5.0) and sweep.rates == (0.5,)
    assert scan_sweep(["p"], settings=["-5:0.2"]).settings == (Schedule(-5, 0.2),)
    with pytest.raises(ValueError, match="malformed range '1:2'"):
        scan_sweep(["p"], start="1:2")
    with pytest.raises(ValueError, match="--seed values must be whole numbers"):
        scan_sweep(["p"], seed="0:1:3")
    with pytest.raises(ValueError, match="^--seed: malformed range 'a'"):
        scan_sweep(["p"], seed="a")


def test_on_tiles_reports_each_batch_then_resumed_tiles(sd, tmp_path):
    sweep = Sweep(prompts=("a red cat",), blocks=("U1A1A2",), starts=(-5.0, 5.0), rates=(0.5,))
    seen = []
    result = run_scan(sd, sweep, BASE, out=tmp_path, batch_size=2, progress=False, on_tiles=seen.append)
    assert [len(b) for b in seen] == [2, 2, 2]  # 3 starts x 2 rates, batches of 2
    assert all(t.status == "done" and t.image is not None for b in seen for t in b)
    assert {t.recipe.key for b in seen for t in b} == {t.recipe.key for t in result.tiles}
    again = []
    run_scan(sd, sweep, BASE, out=tmp_path, batch_size=2, progress=False, on_tiles=again.append)
    assert len(again) == 1 and len(again[0]) == 6 and all(t.path.is_file() for t in again[0])


def test_cell_box_crops_a_tile_back_out_of_a_sheet():
    tiles = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    title = "cross-attention per word: 'a red cat'"
    sheet = make_grid([tiles], ["image", "red", "cat"], [""], title=title, tile_px=128)
    for col, tile in enumerate(tiles):
        crop = sheet.crop(cell_box(0, col, [""], tile_px=128, title=title))
        assert crop.tobytes() == display_tile(tile, 128).tobytes()


def test_cli_ui_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'attnmod ui: error: the web page needs Gradio: pip install "attnmod[ui]"'


def test_job_queue_runs_one_job_at_a_time_and_cancels_at_the_next_unet_call(sd):
    pytest.importorskip("gradio", reason="the page's job queue ships with the ui extra")
    from attnmod.generate import render
    from attnmod.ui.jobs import JobCancelled, JobQueue

    queue = JobQueue(sd)
    try:
        _queue_checks(sd, queue, render, JobCancelled)
    finally:
        queue.close()
    assert hook_count(sd.unet) == 0


def _queue_checks(sd, queue, render, JobCancelled):
    started = threading.Event()
    order = []

    def slow(job):
        order.append(("slow", "start"))
        started.set()
        while not job.cancel.is_set():
            time.sleep(0.01)
        render(sd, [BASE])  # the next UNet call raises JobCancelled
        order.append(("slow", "unreachable"))

    def quick(job):
        order.append(("quick", "start"))
        return render(sd, [BASE]).shape

    first = queue.submit("scan", "alice", slow)
    started.wait(10)
    second = queue.submit("generate", "bob", quick)
    third = queue.submit("maps", "alice", quick)
    time.sleep(0.1)
    assert second.state == "waiting" and queue.ahead_of(second) == 1
    assert queue.describe() == "queue: running scan #1; waiting 2: generate #2, maps #3"
    assert queue.cancel("alice") == 2  # alice's running and waiting jobs
    for job in (first, second, third):
        assert job.done.wait(60)
    assert first.state == "cancelled" and isinstance(first.error, JobCancelled)
    assert third.state == "cancelled" and second.state == "done" and second.result == (1, 32, 32, 3)
    assert order == [("slow", "start"), ("quick", "start")]
    assert second.unet_calls > 0 and queue.describe() == "queue: idle"


def test_the_page_session_and_scan_form_work_on_a_dit_model(sd3, tmp_path):
    pytest.importorskip("gradio")
    from attnmod.dit import default_block
    from attnmod.ui.scan_tab import plan_scan
    from attnmod.ui.session import Session

    session = Session(sd3, "tiny-sd3", tmp_path)
    try:
        assert session.default_block == default_block(sd3) == "J1I"
        labels = dict((short, label) for label, short in session.block_choices())
        assert labels["J1I"] == "J1I · image" and labels["J0T"] == "J0T · text"
        view, errors = plan_scan(session, "a red cat", "", "0", "2", "5", "32x32", ["J1I"], False, "-5:5:3", "0",
                                 "", "")
        assert errors == {} and view.total == 4  # -5, 0, 5 and the default tile
        view, errors = plan_scan(session, "a red cat", "", "0", "2", "5", "32x32", ["U1A1A2"], False, "1", "0", "",
                                 "")
        assert view is None and "a UNet block name" in errors["blocks"]
    finally:
        session.queue.close()


@pytest.mark.parametrize("model", ["toy", "toy-layout", None])
def test_both_embedded_models_read_their_grammar_only_and_others_any_text(model):
    from attnmod.jobs import model_prompt

    assert model_prompt(model, "a large red star in the center, on a striped blue background, flat style.") == \
        "a large red star in the center, on a striped blue background, flat style"
    with pytest.raises(ValueError):
        model_prompt(model, "a photo of a dog")
    assert model_prompt("tiny", "a photo of a dog.") == "a photo of a dog."


def test_the_page_starts_both_embedded_models_on_the_readme_block(tmp_path):
    from attnmod.ui.session import Session

    assert Session.load("toy-layout", tmp_path).default_block == "U2A2A2"  # the same architecture as toy
