"""The web page (``attnmod ui``) in a real headless browser: Debian's chromium driven by Playwright, the page
served in-process on the embedded model. Screenshots of each step go to a temporary folder (or to
$ATTNMOD_UI_SCREENSHOTS). Skipped, saying why, only where Gradio, Playwright or chromium is not installed."""

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REQUIRED = os.environ.get("ATTNMOD_REQUIRE_BROWSER") == "1"  # CI: a missing browser is a failure, not a skip
try:
    import gradio  # noqa: F401
    from playwright import sync_api
except ImportError as e:
    if REQUIRED:
        raise
    pytest.skip(f'browser tests need the ui extra and Playwright: pip install "attnmod[ui]" playwright ({e})',
                allow_module_level=True)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if REQUIRED:
        raise RuntimeError("ATTNMOD_REQUIRE_BROWSER=1 but there is no chromium on PATH")
    pytest.skip("browser tests need chromium on PATH (Debian: apt-get install chromium)", allow_module_level=True)

from attnmod.cli import main  # noqa: E402
from attnmod.grid import FRAME  # noqa: E402

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a large red star in the center, on a striped blue background, flat style"
STEPS = "4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from attnmod import ui

    out = tmp_path_factory.mktemp("ui-out")
    demo, session = ui.create("toy", out)
    port = _free_port()
    ui.launch(demo, session, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", session
    demo.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("ATTNMOD_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(server, browser):
    """One page for the module's tests, in order; console errors and every request host recorded."""
    url, _ = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.errors, page.hosts = [], set()
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("request", lambda r: page.hosts.add(r.url.split("/")[2]))
    page.goto(url)
    page.wait_for_selector("#scan-run", timeout=60_000)
    yield page
    page.close()


def fill(page, element_id: str, value: str) -> None:
    page.fill(f"#{element_id} textarea, #{element_id} input", value)


def run_scan(page, start="-5,1,5", rate="-0.5,0,0.5", wait=True, **fields):
    for name, value in {"start": start, "rate": rate, "steps": STEPS, "prompt": PROMPT, "seed": "1",
                        "settings": "", "folder": "", **fields}.items():
        fill(page, f"scan-{name}", value)
    page.evaluate("(() => { const e = document.querySelector('#scan-progress-text'); if (e) e.textContent = ''; })()")
    page.click("#scan-run")
    if wait:
        wait_scan(page)


def wait_scan(page, states=("done",)):
    condition = " || ".join(f"t.includes('· {s}')" for s in states)
    page.wait_for_function(f"(() => {{ const e = document.querySelector('#scan-progress-text'); "
                           f"const t = e ? e.textContent : ''; return {condition}; }})()", timeout=180_000)


def thumbnails(page):
    return page.locator("#scan-grid .thumbnail-item")


def fetch(page, selector: str, tmp_path: Path, name: str) -> Path:
    href = page.get_attribute(selector, "href", timeout=30_000)
    path = tmp_path / name
    path.write_bytes(page.request.get(href).body())
    return path


def pixels(path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_page_loads_offline_with_no_console_errors(page, shots):
    page.screenshot(path=str(shots / "01-loaded.png"), full_page=True)
    assert page.locator("#tab-scan").count() == 1
    for tab in ("Stack / generate", "Influence", "Strategy", "Maps", "Edit", "Style"):
        assert page.get_by_role("tab", name=tab).count() == 1
    blocks = page.inner_text("#scan-blocks")
    assert "U2A2A2 · 8×8 · cross" in blocks
    assert page.errors == []
    assert page.hosts <= {page.url.split("/")[2]}, f"the page fetched from {page.hosts}"


def test_a_3x3_scan_shows_nine_tiles_default_framed(page, server, shots, tmp_path):
    run_scan(page)
    page.screenshot(path=str(shots / "02-scan.png"), full_page=True)
    tiles = thumbnails(page)
    assert tiles.count() == 9
    captions = [tiles.nth(i).inner_text() for i in range(9)]
    assert captions[4].startswith("default") and sum(c.startswith("default") for c in captions) == 1
    assert "x: start multiplier → -5 · 1 · 5" in page.inner_text("#scan-header")
    framed = tmp_path / "framed.png"
    framed.write_bytes(page.request.get(tiles.nth(4).locator("img").get_attribute("src")).body())
    other = tmp_path / "other.png"
    other.write_bytes(page.request.get(tiles.nth(0).locator("img").get_attribute("src")).body())
    assert Image.open(framed).convert("RGB").getpixel((1, 1)) == FRAME
    assert Image.open(other).convert("RGB").getpixel((1, 1)) != FRAME
    assert "rendered 9 of 9 images (0 already done)" in page.inner_text("#scan-status")
    assert page.errors == []


def test_clicking_a_tile_shows_its_recipe_and_the_clis_image(page, shots, tmp_path):
    thumbnails(page).nth(8).click()  # start 5, rate 0.5
    page.wait_for_function("document.querySelector('#scan-tile-setting textarea').value.includes('start 5')")
    page.screenshot(path=str(shots / "03-tile.png"), full_page=True)
    setting = page.input_value("#scan-tile-setting textarea")
    assert setting.startswith("start 5 · rate 0.5") and "U2A2A2=5:0.5" in setting
    recipe = json.loads(page.locator("#scan-recipe .cm-content").inner_text())
    assert recipe["mods"] == {"up_blocks.2.attentions.2.transformer_blocks.0.attn2": {
        "start": 5.0, "rate": 0.5, "accel": 0.0}} and recipe["seed"] == 1 and recipe["steps"] == 4
    downloaded = fetch(page, "#scan-download a", tmp_path, "tile.png")
    with Image.open(downloaded) as im:
        assert json.loads(im.text["attnmod"]) == recipe  # the PNG carries the recipe shown
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    assert main(["generate", "--recipe", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "cli.png"),
                 "--quiet"]) == 0
    assert pixels(tmp_path / "cli.png") == pixels(downloaded)  # the CLI remakes the page's image exactly


def test_scan_finer_makes_a_new_grid_centred_on_the_clicked_setting(page, shots):
    page.evaluate("(() => { const e = document.querySelector('#scan-progress-text'); if (e) e.textContent = ''; })()")
    page.click("#scan-finer")
    wait_scan(page)
    page.screenshot(path=str(shots / "04-finer.png"), full_page=True)
    assert page.input_value("#scan-start textarea") == "1:9:5"  # centred on 5: neighbours 1 .. 9
    assert page.input_value("#scan-rate textarea") == "0:1:5"  # centred on 0.5
    header = page.inner_text("#scan-header")
    assert "start multiplier → 1 · 3 · 5 · 7 · 9" in header and "rate per step ↓ 0 · 0.25 · 0.5 · 0.75 · 1" in header
    tiles = thumbnails(page)
    assert tiles.count() == 25
    assert tiles.nth(12).inner_text().startswith("start 5 · rate 0.5")  # the clicked setting in the middle


def test_a_bad_range_shows_an_error_next_to_the_field_not_a_traceback(page, shots):
    fill(page, "scan-start", "1:2")
    page.click("#scan-run")
    page.wait_for_function("document.querySelector('#scan-start-error').innerText.includes('malformed')")
    page.screenshot(path=str(shots / "05-bad-range.png"), full_page=True)
    message = page.inner_text("#scan-start-error")
    assert "malformed range '1:2': use a:b:n (n values from a to b) or a list v1,v2,..." in message
    assert len(message.strip().splitlines()) == 1
    assert "Traceback" not in page.content() and page.inner_text("#scan-rate-error").strip() == ""
    fill(page, "scan-seed", "x")
    page.click("#scan-run")
    page.wait_for_function("document.querySelector('#scan-seed-error').innerText.includes('malformed')")
    fill(page, "scan-seed", "1")


def test_a_png_dropped_on_the_page_restores_its_recipe(page, shots, tmp_path):
    png = tmp_path / "cli.png"
    assert main(["generate", "--prompt", PROMPT, "--seed", "7", "--steps", STEPS, "--mod", "U2A2A2=-5:0.2",
                 "--mod", "U3A1A2=3", "--out", str(png), "--quiet"]) == 0
    page.get_by_role("tab", name="Stack / generate").click()
    page.set_input_files("#stack-drop input[type=file]", str(png))
    page.wait_for_function("document.querySelector('#stack-mods textarea').value.includes('U2A2A2')")
    page.screenshot(path=str(shots / "06-dropped.png"), full_page=True)
    assert page.input_value("#stack-prompt textarea") == PROMPT
    assert page.input_value("#stack-seed textarea") == "7" and page.input_value("#stack-steps textarea") == STEPS
    assert page.input_value("#stack-mods textarea").splitlines() == ["U2A2A2=-5:0.2", "U3A1A2=3:0"]
    page.click("#stack-generate")  # the restored recipe remakes the same image
    page.wait_for_selector("#stack-download a", timeout=120_000)
    assert pixels(fetch(page, "#stack-download a", tmp_path, "again.png")) == pixels(png)
    page.get_by_role("tab", name="Scan").click()


def test_scan_results_continue_from_the_cli_and_vice_versa(page, server, shots, tmp_path):
    folder = tmp_path / "from-cli"
    assert main(["scan", "--prompt", PROMPT, "--seed", "2", "--block", "U2A2A2", "--start=-5,5", "--rate=0.5",
                 "--steps", STEPS, "--out", str(folder), "--quiet"]) == 0
    run_scan(page, start="-5,5", rate="0.5", seed="2", folder=str(folder))
    assert "rendered 0 of 6 images (6 already done)" in page.inner_text("#scan-status")
    assert thumbnails(page).count() == 6
    # cancel a page scan part-way; the command the page shows continues it
    run_scan(page, start="-20:50:8", rate="-1:1:5", seed="3", steps="10", wait=False)  # 9 x 5 tiles
    try:
        page.wait_for_function("/[1-9]\\d*\\/45 tiles/.test(document.querySelector('#scan-progress-text')"
                               "?.textContent || '')", timeout=120_000)
    finally:
        page.screenshot(path=str(shots / "07-cancel.png"), full_page=True)
    page.click("#scan-cancel")
    wait_scan(page, ("cancelled",))
    kept = int(page.inner_text("#scan-progress-text").split("/")[0])
    assert 0 < kept < 45 and "cancelled" in page.inner_text("#scan-status")
    command = page.input_value("#scan-command textarea")
    argv = __import__("shlex").split(command)
    assert argv[:2] == ["attnmod", "scan"]
    capsys_free = tmp_path / "log.txt"
    with open(capsys_free, "w") as log, __import__("contextlib").redirect_stdout(log):
        assert main(argv[1:] + ["--quiet"]) == 0
    assert f"rendered {45 - kept} of 45 images ({kept} already done)" in capsys_free.read_text()


def test_influence_ranks_blocks_and_a_click_sends_one_to_the_scan(page, shots):
    page.get_by_role("tab", name="Influence").click()
    fill(page, "influence-steps", STEPS)
    fill(page, "influence-blocks", "U2*")
    page.click("#influence-run")
    page.wait_for_selector("#influence-ranked .thumbnail-item", timeout=180_000)
    page.screenshot(path=str(shots / "07-influence.png"), full_page=True)
    ranked = page.locator("#influence-ranked .thumbnail-item")
    assert ranked.count() == 6  # U2's 3 attentions x self/cross
    first = ranked.nth(0).inner_text()
    assert first.startswith("1. U2")
    ranked.nth(0).click()
    page.wait_for_selector("#scan-run", state="visible")
    assert first.split()[1] in page.inner_text("#scan-blocks")
    assert page.errors == []


def test_maps_word_picker_shows_the_words_heat_map(page, shots):
    page.get_by_role("tab", name="Maps").click()
    fill(page, "maps-steps", STEPS)
    page.click("#maps-run")
    page.wait_for_selector("#maps-results .thumbnail-item", timeout=180_000)
    assert page.locator("#maps-results .thumbnail-item").count() == 4
    page.click("#maps-word input")
    page.get_by_role("option", name="star", exact=True).click()
    page.wait_for_selector("#maps-word-map img", timeout=30_000)
    page.screenshot(path=str(shots / "08-maps.png"), full_page=True)
    fill(page, "maps-seed", "x")
    page.click("#maps-run")
    page.wait_for_function("document.querySelector('#maps-seed-error').innerText.includes('seed')")
    assert "a seed is a whole number, got 'x'" in page.inner_text("#maps-seed-error")
    assert page.errors == []


def test_page_images_equal_the_cli_scan_tiles(page, server, tmp_path):
    """The same scan from the page and from the CLI writes the same tile files, pixel for pixel."""
    _, session = server
    cli = tmp_path / "cli"
    assert main(["scan", "--prompt", PROMPT, "--seed", "4", "--block", "U2A2A2", "--start=-5,5", "--rate=0.5",
                 "--steps", STEPS, "--out", str(cli), "--quiet"]) == 0
    page.get_by_role("tab", name="Scan").click()
    run_scan(page, start="-5,5", rate="0.5", seed="4")
    folder = Path(__import__("shlex").split(page.input_value("#scan-command textarea"))[-1])
    cli_tiles = sorted(p.name for p in (cli / "tiles").glob("*.png"))
    assert cli_tiles == sorted(p.name for p in (folder / "tiles").glob("*.png")) and len(cli_tiles) == 6
    for name in cli_tiles:
        assert np.array_equal(np.asarray(Image.open(cli / "tiles" / name)),
                              np.asarray(Image.open(folder / "tiles" / name)))
    time.sleep(0)


def test_add_to_stack_then_generate_remakes_the_tile(page, tmp_path):
    page.get_by_role("tab", name="Stack / generate").click()
    fill(page, "stack-mods", "")
    page.get_by_role("tab", name="Scan").click()
    run_scan(page, start="-5,5", rate="0.5", seed="5")
    thumbnails(page).nth(3).click()  # start -5, rate 0.5 (rows: rate 0, 0.5; columns: start -5, 1, 5)
    page.wait_for_function("document.querySelector('#scan-tile-setting textarea').value.includes('start -5')")
    tile = fetch(page, "#scan-download a", tmp_path, "tile.png")
    page.click("#scan-add")
    page.get_by_role("tab", name="Stack / generate").click()
    page.wait_for_function("document.querySelector('#stack-mods textarea').value.includes('U2A2A2=-5:0.5')")
    assert page.input_value("#stack-seed textarea") == "5"
    page.evaluate("(() => { const a = document.querySelector('#stack-download a'); if (a) a.remove(); })()")
    page.click("#stack-generate")
    page.wait_for_selector("#stack-download a", timeout=120_000)
    assert pixels(fetch(page, "#stack-download a", tmp_path, "stacked.png")) == pixels(tile)
    fill(page, "stack-mods", "U2A2A2=-5:0.5\nU9A9A9=2")
    page.click("#stack-generate")
    page.wait_for_function("document.querySelector('#stack-mods-error').innerText.includes('U9A9A9')")
    assert "unknown attention block 'U9A9A9'" in page.inner_text("#stack-mods-error")


@pytest.mark.parametrize("tab, count", [("strategy", 1), ("edit", 3), ("style", 1), ("transfer", 2), ("layout", 2),
                                        ("panorama", 1)])
def test_the_method_tabs_run_their_command(page, shots, tab, count):
    page.get_by_role("tab", name=tab.capitalize()).click()
    if tab == "transfer":  # its steps are an option (the reference's 100 by default)
        fill(page, f"{tab}-option", "steps=6\nskip=2")
    else:
        fill(page, f"{tab}-steps", STEPS)
    if tab == "strategy":
        fill(page, f"{tab}-blocks", "U2*")
    if tab == "layout":
        fill(page, f"{tab}-option", "guidance_steps=1")
    if tab == "panorama":
        fill(page, f"{tab}-width", "96")
        fill(page, f"{tab}-style_prompt", "a large blue star, on a dotted white background")
    page.click(f"#{tab}-run")
    page.wait_for_function(f"(document.querySelector('#{tab}-status')?.innerText || '').startsWith('done')",
                           timeout=180_000)
    page.screenshot(path=str(shots / f"09-{tab}.png"), full_page=True)
    assert page.locator(f"#{tab}-results .thumbnail-item").count() == count
    assert "wrote" in page.input_value(f"#{tab}-log textarea")
    assert page.errors == []
    folder = Path(page.inner_text(f"#{tab}-status").removeprefix("done:").strip())
    from attnmod import Recipe

    sheets = ("grid.png", "side-by-side.png", "words.png", "segments.png", "self-attention-pca.png")
    images = [p for p in folder.glob("*.png") if p.name not in sheets]
    assert images and {Recipe.from_png(p).model for p in images} == {"toy"}  # the page's model, by its alias
