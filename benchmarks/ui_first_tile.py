"""The web page's overhead: time from pressing Run to the first tile shown in the browser, against the same
scan through the library (what ``attnmod scan`` calls, model already loaded) and through the ``attnmod scan``
command (a new process: start-up and model loading included), on the embedded model.

    python benchmarks/ui_first_tile.py            # 3x3 scan at the model's 20 steps, 5 rounds (docs/attnmod.md)
    python benchmarks/ui_first_tile.py --quick    # 4 steps, 2 rounds (CI: proves it runs)

Needs the ui extra, Playwright and chromium (as the browser tests). Each round uses a new seed, so nothing
is resumed; page and library rounds are interleaved. Medians are reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PROMPT = "a large red star in the center, on a striped blue background, flat style"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START, RATE, BLOCK = "-5,1,5", "-0.5,0,0.5", "U2A2A2"


def page_round(page, seed: int, steps: int) -> float:
    for name, value in (("prompt", PROMPT), ("seed", str(seed)), ("steps", str(steps)), ("start", START),
                        ("rate", RATE), ("settings", ""), ("folder", "")):
        page.fill(f"#scan-{name} textarea", value)
    t0 = time.perf_counter()
    page.click("#scan-run")
    page.wait_for_function(f"(document.querySelector('#scan-command textarea')?.value || '').includes('--seed={seed} ')"
                           " && [...document.querySelectorAll('#scan-grid .caption-label')]"
                           ".some(e => !e.textContent.endsWith('…'))", timeout=600_000, polling=10)
    first = time.perf_counter() - t0
    page.wait_for_function("(document.querySelector('#scan-progress-text')?.textContent || '').includes('9/9 tiles · done')",
                           timeout=600_000)
    return first


def library_round(session, seed: int, steps: int, out: Path) -> float:
    """The library's scan in a job thread of the page's queue (as the page runs it, and away from Playwright's
    greenlets in the main thread): seconds from the call to its first batch of tiles."""
    job = session.queue.submit("bench", "bench", lambda job: _library_scan(session, seed, steps, out))
    job.done.wait()
    if job.error is not None:
        raise job.error
    return job.result


def _library_scan(session, seed: int, steps: int, out: Path) -> float:
    from attnmod.jobs import base_recipe, scan_sweep
    from attnmod.sweep import run_scan

    t0 = time.perf_counter()
    first = []
    sweep = scan_sweep([PROMPT], seed=str(seed), blocks=[BLOCK], start=START, rate=RATE)
    base, _ = base_recipe(session.pipe, "toy", PROMPT, steps=steps)
    run_scan(session.pipe, sweep, base, out=out, progress=False,
             on_tiles=lambda tiles: first.append(time.perf_counter() - t0) if not first else None)
    return first[0]


def cli_round(seed: int, steps: int, out: Path) -> float:
    """A new ``attnmod scan`` process: seconds until its first tile file exists."""
    cmd = [sys.executable, "-m", "attnmod.cli", "scan", "--prompt", PROMPT, "--seed", str(seed), "--block", BLOCK,
           f"--start={START}", f"--rate={RATE}", "--steps", str(steps), "--out", str(out), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while proc.poll() is None or first is None:
        if first is None and any((out / "tiles").glob("*.png")):
            first = time.perf_counter() - t0
        if proc.poll() is not None and first is None:
            first = time.perf_counter() - t0 if any((out / "tiles").glob("*.png")) else float("nan")
        time.sleep(0.005)
    return first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 steps, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    steps, rounds = (4, 2) if args.quick else (20, 5)
    rounds = args.rounds or rounds
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright

        from attnmod import ui
    except ImportError as e:
        print(f"skipped: {e}")
        return 0
    if chromium is None:
        print("skipped: no chromium on PATH")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="attnmod-ui-bench-"))
    demo, session = ui.create("toy", tmp / "page")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui.launch(demo, session, port=port, block=False)
    times = {"page": [], "library": [], "cli": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#scan-run", timeout=60_000)
        page_round(page, 1000, steps)  # warm-up (first pipeline call, first page update)
        library_round(session, 1001, steps, tmp / "warm")
        for r in range(rounds):
            times["page"].append(page_round(page, 2000 + r, steps))
            times["library"].append(library_round(session, 3000 + r, steps, tmp / f"lib-{r}"))
        browser.close()
    demo.close()
    for r in range(max(1, rounds // 2)):
        times["cli"].append(cli_round(4000 + r, steps, tmp / f"cli-{r}"))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# time from Run to the first tile: 3x3 scan of {BLOCK} on the embedded model, {steps} steps, first "
          f"batch of 8 tiles (torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}), median of "
          f"{rounds} rounds")
    print(f"page (click Run -> first tile shown in chromium):   {med['page']:.2f} s")
    print(f"library (run_scan -> first batch, model loaded):   {med['library']:.2f} s")
    print(f"page overhead:                                     {med['page'] - med['library']:+.2f} s "
          f"({med['page'] / med['library']:.2f}x)")
    print(f"attnmod scan command (new process -> first file):  {med['cli']:.2f} s (start-up and model load included, "
          f"median of {len(times['cli'])})")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
