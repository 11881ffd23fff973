"""Guard rails: bad recipes are one-line errors naming the file; written files follow the umask; a scan's
output folder is locked while a run writes it; a failed tile write names the file."""

import errno
import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import attnmod.sweep as scan_mod
from attnmod import Recipe, Schedule, Sweep, run_scan
from attnmod.cli import _read_command_recipe, _read_recipe, main
from attnmod.influence import block_influence
from attnmod.lock import LOCK_NAME, folder_lock
from attnmod.methods.p2p import EditOptions
from attnmod.recipe import atomic_write, current_umask, save_png, write_json

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

RECIPE = Recipe("a red cat", seed=3, steps=2, guidance=5.0, width=32, height=32, model="tiny",
                mods=(("up_blocks.1.attentions.1.transformer_blocks.0.attn2", Schedule(-5, 0.2)),))
BASE = Recipe("a red cat", steps=2, guidance=5.0, width=32, height=32, model="tiny")
NOISE = np.random.default_rng(0).random((64, 64, 3))  # incompressible: the image data is most of the file


def _one_line_error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- reading recipes ---------------------------------------------------------------------------------

def test_a_truncated_png_still_gives_its_recipe(tmp_path):
    whole = save_png(NOISE, tmp_path / "whole.png", RECIPE)
    data = whole.read_bytes()
    assert data.index(b"IDAT") < len(data) // 2  # the recipe chunks come before the image data
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError), Image.open(cut) as im:
        im.load()  # the pixels are gone...
    assert Recipe.from_png(cut) == RECIPE  # ...the recipe is not
    assert Recipe.from_file(cut) == RECIPE and _read_recipe(str(cut)) == RECIPE


def test_an_image_that_is_not_an_attnmod_png_is_one_line(tmp_path, capsys):
    jpg = tmp_path / "x.jpg"
    Image.fromarray((NOISE * 255).astype(np.uint8)).save(jpg, format="JPEG")
    message = f"{jpg} is not a PNG written by attnmod (no attnmod recipe chunk)"
    for reader in (Recipe.from_png, Recipe.from_file, _read_recipe):
        with pytest.raises(ValueError) as e:
            reader(str(jpg))
        assert str(e.value) == message
    disguised = tmp_path / "recipe.json"  # decided by content, not by the name
    disguised.write_bytes(jpg.read_bytes())
    with pytest.raises(ValueError, match=f"^{disguised} is not a PNG written by attnmod"):
        Recipe.from_file(disguised)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ValueError, match="plain.png is not a PNG written by attnmod"):
        Recipe.from_file(plain)
    err = _one_line_error(["generate", "--recipe", str(jpg), "--out", str(tmp_path / "o.png")], capsys)
    assert err == f"attnmod generate: error: {message}"


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "p", "colour": 1}', "recipe has an unknown key 'colour'; valid keys: version, prompt, "
                                     "negative_prompt, seed, steps, guidance, width, height, model, scheduler, "
                                     "mods, encoder_weights, model_id, device, dtype"),
    ('{"seed": 1}', "recipe has no prompt"),
    ('{"prompt": "p", "steps": "4"}', 'recipe field steps must be an integer, got "4"'),
    ('{"prompt": "p", "guidance": "x"}', 'recipe field guidance must be a finite number, got "x"'),
    ('{"prompt": "p", "guidance": NaN}', "recipe field guidance must be a finite number, got NaN"),
    ('{"prompt": "p", "seed": 1.5}', "recipe field seed must be an integer, got 1.5"),
    ('{"prompt": "p", "seed": -1}', "recipe field seed must be from 0 to 2**64 - 1, got -1"),
    ('{"prompt": "p", "width": true}', "recipe field width must be an integer, got true"),
    ('{"prompt": ["p"]}', 'recipe field prompt must be a string, got ["p"]'),
    ('{"prompt": "p", "model": null}', "recipe field model must be a string, got null"),
    ('{"prompt": "p", "mods": []}', "recipe field mods must be an object, got []"),
    ('{"prompt": "p", "mods": {"U1A1A2": {"start": "x"}}}',
     """recipe mod 'U1A1A2': start must be a finite number, got "x\""""),
    ('{"prompt": "p", "mods": {"U1A1A2": {"strat": 2}}}',
     "recipe mod 'U1A1A2' has an unknown key 'strat'; valid keys: start, rate, accel, values"),
    ('{"prompt": "p", "encoder_weights": [1, "2"]}',
     'recipe field encoder_weights must be a list of finite numbers, got [1, "2"]'),
    ('{"prompt": "p", "steps": 0}', "steps must be >= 1, got 0"),
    ('{"prompt": "p", "version": 2}', "recipe version 2 is newer than this attnmod reads (1)"),
    ("[1, 2]", "a recipe must be a JSON object {...}, got [1, 2]"),
    ('"a red cat"', 'a recipe must be a JSON object {...}, got "a red cat"'),
])
def test_bad_recipe_json_is_one_line_naming_file_and_field(tmp_path, capsys, text, message):
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        _read_recipe(str(path))
    assert str(e.value) == f"{path}: {message}"
    err = _one_line_error(["generate", "--recipe", str(path), "--out", str(tmp_path / "o.png")], capsys)
    assert err == f"attnmod generate: error: {path}: {message}"


def test_unreadable_recipe_files_are_one_line(tmp_path, capsys):
    bad_json = tmp_path / "r.json"
    bad_json.write_text('{"prompt": "p",\n "seed": 1,,\n}')
    binary = tmp_path / "r.bin"
    binary.write_bytes(b"\x80\x81 not text")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = {
        bad_json: f"{bad_json} is not valid JSON (line 2, column 12: Expecting property name enclosed in double quotes)",
        binary: f"{binary} is neither a PNG written by attnmod nor a recipe JSON (not UTF-8 text)",
        folder: f"{folder} is a folder, not a recipe file (give a PNG attnmod wrote or a recipe JSON)",
        tmp_path / "missing.json": f"{tmp_path / 'missing.json'} does not exist",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError) as e:
            _read_recipe(str(path))
        assert str(e.value) == message
        assert _one_line_error(["generate", "--recipe", str(path), "--out", str(tmp_path / "o.png")],
                               capsys) == f"attnmod generate: error: {message}"
    with pytest.raises(ValueError, match="does not exist"):
        Recipe.from_png(tmp_path / "missing.png")


def test_a_corrupt_recipe_chunk_is_one_line(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("attnmod", '{"prompt": ')
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    with pytest.raises(ValueError) as e:
        _read_recipe(str(path))
    assert str(e.value) == f"{path}: its attnmod recipe chunk is not valid JSON (line 1, column 12: Expecting value)"
    broken = tmp_path / "broken.png"  # a PNG signature, then garbage
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match=f"^cannot read {broken}: "):
        _read_recipe(str(broken))


def test_recipes_written_by_attnmod_still_read_back(tmp_path):
    assert Recipe.from_dict(json.loads(json.dumps(RECIPE.to_dict()))) == RECIPE
    path = tmp_path / "r.json"
    write_json(path, RECIPE.to_dict())
    assert _read_recipe(str(path)) == RECIPE
    path.write_text('\ufeff{"prompt": "p", "guidance": 7}')  # a BOM and an integer guidance are fine
    assert _read_recipe(str(path)) == Recipe("p", guidance=7.0)


def _command_png(tmp_path, command, value, name="x.png"):
    return save_png(NOISE, tmp_path / name, RECIPE, extra={f"attnmod_{command}": value})


def test_command_recipe_chunks_are_checked(tmp_path, capsys):
    edit = {"source": "a red cat", "target": "a red dog", "mode": "swap", "options": asdict(EditOptions())}
    good = _command_png(tmp_path, "edit", {**edit, "image": "edit"})
    recipe, info = _read_command_recipe(str(good), "edit")
    assert recipe == RECIPE and info["target"] == "a red dog"
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert _read_command_recipe(str(cut), "edit")[1] == info  # truncated: the chunks are still there
    corrupt = {
        "missing.png": ({k: v for k, v in edit.items() if k != "target"}, "target is missing or of the wrong type"),
        "list.png": ([1], "source is missing or of the wrong type"),
        "blend.png": ({**edit, "options": {"local_blend": "cat"}}, "options.local_blend is missing or not a list"),
        "option.png": ({**edit, "options": {**edit["options"], "colour": 1}}, "unexpected keyword argument 'colour'"),
        "range.png": ({**edit, "options": {**edit["options"], "self_replace_steps": 2}},
                      "replace steps are fractions in [0, 1], got 2"),
    }
    for name, (value, reason) in corrupt.items():
        path = _command_png(tmp_path, "edit", value, name)
        with pytest.raises(ValueError) as e:
            _read_command_recipe(str(path), "edit")
        assert str(e.value).startswith(f"{path}: its attnmod_edit chunk is corrupt (") and reason in str(e.value)
    err = _one_line_error(["edit", "--recipe", str(tmp_path / "list.png"), "--out", str(tmp_path / "e")], capsys)
    assert "its attnmod_edit chunk is corrupt" in err and not (tmp_path / "e").exists()
    jpg = tmp_path / "x.jpg"
    Image.new("RGB", (8, 8)).save(jpg)
    for path in (jpg, good):
        err = _one_line_error(["style", "--recipe", str(path), "--out", str(tmp_path / "s")], capsys)
        assert err == f"attnmod style: error: {path} was not written by attnmod style (no attnmod_style text chunk)"
    style = _command_png(tmp_path, "style", {"prompts": ["a"], "index": "0", "ref_image": None, "ref_prompt": None,
                                             "style_aligned": {}}, "style.png")
    with pytest.raises(ValueError, match="attnmod_style chunk is corrupt \\(index is missing"):
        _read_command_recipe(str(style), "style")


# --- written files follow the umask -----------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        json_file = write_json(tmp_path / "a.json", {"x": 1})
        png = save_png(NOISE, tmp_path / "sub" / "a.png", RECIPE)
        again = write_json(tmp_path / "a.json", {"x": 2})  # replacing a file too
    finally:
        os.umask(old)
    for path in (json_file, png, again):
        assert path.stat().st_mode & 0o777 == mode
    assert not list(tmp_path.rglob("*.tmp"))


# --- failed writes name the file --------------------------------------------------------------------

def _disk_full(f):
    f.write(b"half")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_names_the_file_and_leaves_the_old_one(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(OSError) as e:
        atomic_write(path, _disk_full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert str(e.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{path}'"
    assert json.loads(path.read_text()) == {"x": 1} and not list(tmp_path.glob(".*.tmp"))
    folder = tmp_path / "folder"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(IsADirectoryError) as e:  # the rename fails: the file is named, not the temp file
        atomic_write(folder, lambda f: f.write(b"x"))
    assert e.value.filename == str(folder) and e.value.filename2 is None and not list(tmp_path.glob(".*.tmp"))


def test_a_tile_write_failure_stops_the_scan_with_a_truthful_manifest(sd, tmp_path, monkeypatch):
    sweep = Sweep(prompts=("a red cat",), starts=(-5.0,), rates=(0.0,))  # 2 tiles: default and -5
    real_save = scan_mod.save_png
    calls = []

    def save_then_fill_the_disk(image, path, recipe, short, **kw):
        calls.append(path)
        if len(calls) == 2:
            return atomic_write(path, _disk_full)
        return real_save(image, path, recipe, short, **kw)

    monkeypatch.setattr(scan_mod, "save_png", save_then_fill_the_disk)
    with pytest.raises(OSError) as e:
        run_scan(sd, sweep, BASE, out=tmp_path, batch_size=1, progress=False)
    assert e.value.filename == str(calls[1]) and "tiles" in e.value.filename
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    status = {t["file"]: t["status"] for t in manifest["tiles"]}
    assert status == {str(calls[0].relative_to(tmp_path)): "done", str(calls[1].relative_to(tmp_path)): "pending"}
    assert calls[0].exists() and not calls[1].exists() and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(scan_mod, "save_png", real_save)
    again = run_scan(sd, sweep, BASE, out=tmp_path, batch_size=1, progress=False)  # lock released; resumes
    assert again.pending_count == 1 and (tmp_path / LOCK_NAME).exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sheets"] == ["grid.png"] and all(t["status"] == "done" for t in manifest["tiles"])


def test_the_manifest_of_a_long_scan_takes_at_most_a_tenth_of_the_drivers_time(tmp_path, monkeypatch):
    clock, writes = [100.0], []
    monkeypatch.setattr(scan_mod.time, "monotonic", lambda: clock[0])

    def write_manifest(path, result, base):
        writes.append(clock[0])
        clock[0] += 0.5  # a manifest of many thousand tiles: half a second per write

    monkeypatch.setattr(scan_mod, "write_manifest", write_manifest)
    manifest = scan_mod._Manifest(tmp_path / "manifest.json", None, BASE)
    for _ in range(20):  # a batch finishes every second
        manifest.maybe_write()
        clock[0] += 1.0
    assert writes == [100.0, 105.5, 111.0, 116.5]  # the first batch, then once 10 x 0.5 s passed since the last
    manifest.write()  # at the end (and on an error) always
    assert len(writes) == 5


def test_png_compression_changes_the_bytes_not_the_pixels_or_the_recipe(sd, tmp_path):
    sweep = Sweep(prompts=("a red cat",), starts=(-5.0,), rates=(0.0,))
    fast = run_scan(sd, sweep, BASE, out=tmp_path / "fast", png_compression=1, progress=False)
    small = run_scan(sd, sweep, BASE, out=tmp_path / "small", progress=False)
    for a, b in zip(fast.tiles, small.tiles, strict=True):
        assert a.path.name == b.path.name and a.path.read_bytes() != b.path.read_bytes()
        assert np.array_equal(np.asarray(Image.open(a.path)), np.asarray(Image.open(b.path)))
        assert Recipe.from_png(a.path) == Recipe.from_png(b.path)
    with pytest.raises(ValueError, match="zlib level 0-9"):
        run_scan(sd, sweep, BASE, out=tmp_path / "bad", png_compression=10, progress=False)
    assert not (tmp_path / "bad").exists()


# --- the output folder lock -------------------------------------------------------------------------

def _hold_lock_like_another_process(folder):
    """Lock ``folder`` through a separate open file, as another process would."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_NAME, "a+")  # noqa: SIM115
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write("4242\n")
    f.flush()
    return f


@pytest.mark.skipif(fcntl is None, reason="no fcntl: runs are not locked")
def test_a_locked_output_folder_is_refused_before_any_work(sd, tmp_path, monkeypatch):
    out = tmp_path / "scan"
    holder = _hold_lock_like_another_process(out)
    rendered = []
    monkeypatch.setattr(scan_mod, "render", lambda *a: rendered.append(a))
    sweep = Sweep(prompts=("a red cat",), starts=(-5.0,), rates=(0.0,))
    message = f"{out} is being written by another attnmod run (pid 4242); wait for it or choose another --out"
    try:
        with pytest.raises(ValueError) as e:
            run_scan(sd, sweep, BASE, out=out, progress=False)
        assert str(e.value) == message
        with pytest.raises(ValueError, match="is being written by another attnmod run"):
            block_influence(sd, BASE, blocks="U1A1*", out=out, progress=False)
        assert not rendered and [p.name for p in out.iterdir()] == [LOCK_NAME]
        assert (out / LOCK_NAME).read_text() == "4242\n"  # the holder's pid is left alone
    finally:
        holder.close()
    with folder_lock(out):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert (out / LOCK_NAME).read_text() == ""


@pytest.mark.skipif(fcntl is None, reason="no fcntl: runs are not locked")
def test_the_lock_is_reentrant_in_its_thread_only_and_released_on_errors(tmp_path):
    errors = []

    def other_thread():
        try:
            with folder_lock(tmp_path):
                pass
        except ValueError as e:
            errors.append(str(e))

    with pytest.raises(KeyError), folder_lock(tmp_path), folder_lock(tmp_path / "."):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        raise KeyError("boom")
    assert errors == [f"{tmp_path} is being written by another attnmod run (pid {os.getpid()}); "
                      "wait for it or choose another --out"]
    other_thread()
    assert len(errors) == 1  # released
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(ValueError, match=f"^{afile} is a file, not a folder$"), folder_lock(afile):
        pass


@pytest.mark.skipif(fcntl is None, reason="no fcntl: runs are not locked")
def test_a_second_scan_on_a_folder_another_process_writes_is_refused(tmp_path, capsys):
    out = tmp_path / "scan"
    code = "import sys, time\nfrom attnmod.lock import folder_lock\nwith folder_lock(sys.argv[1]):\n" \
           "    print('locked', flush=True)\n    time.sleep(120)\n"
    sleeper = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline().strip() == "locked"
        err = _one_line_error(["scan", "--model", "tiny", "--prompt", "a red cat", "--start", "-5", "--steps", "2",
                               "--size", "32x32", "--out", str(out), "--quiet"], capsys)
        assert err == (f"attnmod scan: error: {out} is being written by another attnmod run (pid {sleeper.pid}); "
                       "wait for it or choose another --out")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    finally:
        sleeper.terminate()
        sleeper.wait(timeout=30)
        sleeper.stdout.close()


def test_a_truncated_tile_is_rendered_again_on_resume(sd, tmp_path):
    sweep = Sweep(prompts=("a red cat",), starts=(-5.0,), rates=(0.0,))
    first = run_scan(sd, sweep, BASE, out=tmp_path, progress=False)
    tile = first.tiles[0].path
    tile.write_bytes(tile.read_bytes()[: tile.stat().st_size // 2])
    assert Recipe.from_png(tile) == first.tiles[0].recipe  # its recipe is intact, its pixels are not
    again = run_scan(sd, sweep, BASE, out=tmp_path, progress=False)
    assert again.pending_count == 1 and Image.open(tile).tobytes() == first.image(first.tiles[0]).tobytes()


def test_the_umask_is_read_without_proc_too(monkeypatch):
    import attnmod.recipe as recipe_mod

    def no_proc(*a, **k):
        raise OSError(errno.ENOENT, "no /proc here")

    monkeypatch.setattr(recipe_mod, "open", no_proc, raising=False)
    old = os.umask(0o027)
    try:
        assert recipe_mod.current_umask() == 0o027 and os.umask(0o027) == 0o027  # and left as it was
    finally:
        os.umask(old)
