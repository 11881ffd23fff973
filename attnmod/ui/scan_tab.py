"""The Scan tab: the form of ``attnmod scan``, Run with tiles appearing as they finish, a click on a tile
showing it large with its recipe, and from there: scan finer, try other seeds, add to the stack, download."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import gradio as gr

from .. import guards
from ..blocks import resolve_blocks
from ..jobs import base_recipe, finer_range, mod_texts, scan_sweep, scan_title
from ..loading import EMBEDDED
from ..recipe import Recipe
from ..schedule import Schedule
from ..sweep import check_scan, parse_values, run_scan
from .forms import check_fields, common_checks, error_text, one_line, optional
from .jobs import JobCancelled
from .scan_view import ScanView, scan_command

FIELDS = ("prompt", "negative", "seed", "steps", "guidance", "size", "blocks", "start", "rate", "settings", "folder")
EXAMPLE = "a large red star in the center, on a striped blue background, flat style"


def _error_box(name: str) -> gr.Markdown:
    return gr.Markdown("", elem_id=f"scan-{name}-error", elem_classes=["field-error"])


def build(session) -> SimpleNamespace:
    ui = SimpleNamespace(errors={})
    toy = session.model in EMBEDDED  # the embedded models: their example prompt and seed
    with gr.Row():
        with gr.Column(scale=2):
            ui.prompt = gr.Textbox(label="prompt", value=EXAMPLE if toy else "", elem_id="scan-prompt", lines=2)
            ui.errors["prompt"] = _error_box("prompt")
            ui.negative = gr.Textbox(label="negative prompt", elem_id="scan-negative")
            ui.errors["negative"] = _error_box("negative")
            with gr.Row():
                with gr.Column(min_width=120):
                    ui.seed = gr.Textbox(label="seed(s): 0 or 0,1,2 or 0:9:10", value="1" if toy else "0",
                                         elem_id="scan-seed")
                    ui.errors["seed"] = _error_box("seed")
                with gr.Column(min_width=120):
                    ui.steps = gr.Textbox(label=f"steps (default {session.defaults['steps']})", elem_id="scan-steps")
                    ui.errors["steps"] = _error_box("steps")
                with gr.Column(min_width=120):
                    ui.guidance = gr.Textbox(label=f"guidance (default {session.defaults['guidance']:g})",
                                             elem_id="scan-guidance")
                    ui.errors["guidance"] = _error_box("guidance")
                with gr.Column(min_width=120):
                    ui.size = gr.Textbox(label=f"size (default {session.defaults['width']}x"
                                               f"{session.defaults['height']})", elem_id="scan-size")
                    ui.errors["size"] = _error_box("size")
        with gr.Column(scale=2):
            ui.blocks = gr.Dropdown(session.block_choices(), value=[session.default_block], multiselect=True,
                                    allow_custom_value=True, label="blocks (short name · latent resolution · kind "
                                    "· influence rank once computed); a glob like U2* works too",
                                    elem_id="scan-blocks")
            ui.errors["blocks"] = _error_box("blocks")
            ui.together = gr.Checkbox(label="modify the chosen blocks together (one axis entry A+B)", value=False)
            with gr.Row():
                with gr.Column(min_width=150):
                    ui.start = gr.Textbox(label="start multipliers: a:b:n or v1,v2 (1 always added)",
                                          value="-20:50:8", elem_id="scan-start")
                    ui.errors["start"] = _error_box("start")
                with gr.Column(min_width=150):
                    ui.rate = gr.Textbox(label="rates per step: a:b:n or v1,v2 (0 always added)", value="-1:1:5",
                                         elem_id="scan-rate")
                    ui.errors["rate"] = _error_box("rate")
            ui.settings = gr.Textbox(label="or explicit settings START:RATE, one per line (replace start × rate)",
                                     lines=1, elem_id="scan-settings")
            ui.errors["settings"] = _error_box("settings")
            ui.folder = gr.Textbox(label=f"output folder (empty: {session.out_dir}/scan-<settings hash>; an "
                                         "existing scan folder resumes)", elem_id="scan-folder")
            ui.errors["folder"] = _error_box("folder")
    with gr.Row():
        ui.run = gr.Button("Run scan", variant="primary", elem_id="scan-run")
        ui.cancel = gr.Button("Cancel", elem_id="scan-cancel")
    ui.errors["general"] = _error_box("general")
    ui.progress = gr.HTML("", elem_id="scan-progress")
    ui.status = gr.Markdown("", elem_id="scan-status")
    ui.header = gr.Markdown("", elem_id="scan-header")
    ui.gallery = gr.Gallery(label="tiles (click one)", columns=8, allow_preview=False, format="png",
                            elem_id="scan-grid", height="auto", object_fit="contain")
    ui.command = gr.Textbox(label="the same scan from the command line (continues it in the same folder)",
                            interactive=False, elem_id="scan-command")
    with gr.Row(elem_id="scan-tile-panel"):
        with gr.Column(scale=1):
            ui.tile = gr.Image(label="tile", type="filepath", interactive=False, elem_id="scan-tile",
                               height=320)
            ui.download = gr.File(label="download PNG (its recipe inside)", elem_id="scan-download",
                                  interactive=False)
        with gr.Column(scale=1):
            ui.tile_text = gr.Textbox(label="setting", interactive=False, elem_id="scan-tile-setting")
            ui.recipe = gr.Code(label="recipe", language="json", interactive=False, elem_id="scan-recipe")
            with gr.Row():
                ui.finer = gr.Button("scan finer around this tile", elem_id="scan-finer")
                ui.seeds = gr.Button("try on other seeds", elem_id="scan-other-seeds")
                ui.add = gr.Button("add to my stack", elem_id="scan-add")
            ui.drop = gr.File(label="drop a PNG made by attnmod to restore its prompt, seed, blocks and setting",
                              file_types=[".png"], type="filepath", elem_id="scan-drop")
    with gr.Accordion("the sheet as the CLI writes it (grid.png)", open=False):
        ui.sheet = gr.Image(label="grid.png", type="filepath", interactive=False, elem_id="scan-sheet")
    ui.view = gr.State(None)
    ui.form = [ui.prompt, ui.negative, ui.seed, ui.steps, ui.guidance, ui.size, ui.blocks, ui.start, ui.rate,
               ui.settings, ui.folder]
    return ui


def plan_scan(session, prompt, negative, seed, steps, guidance, size, blocks, together, start, rate, settings,
              folder) -> tuple[ScanView | None, dict[str, str]]:
    """The scan the form asks for, planned and checked (nothing written), or an error per field."""
    model, unet = session.model, session.pipe
    lines = [s.strip() for s in (settings or "").splitlines() if s.strip()]
    blocks = [b for b in (blocks or []) if b]

    def check_blocks():
        if not blocks:
            raise ValueError("choose at least one block")
        for b in blocks:
            resolve_blocks(unet, b)
        return ["+".join(blocks)] if together else blocks

    checks = common_checks(model, prompt, negative, steps, guidance, size)
    checks.update({
        "seed": lambda: guards.seeds(parse_values(str(seed))),
        "blocks": check_blocks,
        "start": optional(start, parse_values),
        "rate": optional(rate, parse_values),
        "settings": lambda: [Schedule.parse(s) for s in lines],
        "folder": lambda: guards.check_output_dir(folder.strip(), "output folder") if folder and folder.strip()
        else None,
    })
    v, errors = check_fields(checks)
    if errors:
        return None, errors
    form = {"prompt": v["prompt"], "negative": v["negative"], "seed": str(seed).strip(), "blocks": v["blocks"],
            "start": (start or "").strip() or None, "rate": (rate or "").strip() or None, "settings": lines,
            "steps": v["steps"], "guidance": v["guidance"],
            "size": f"{v['size'][0]}x{v['size'][1]}" if v["size"] else None}
    try:
        sweep = scan_sweep([form["prompt"]], seed=form["seed"], blocks=form["blocks"], start=form["start"],
                           rate=form["rate"], settings=lines)
    except ValueError as e:
        return None, {"general": one_line(e)}
    try:
        base, _ = base_recipe(session.pipe, model, form["prompt"], negative_prompt=form["negative"],
                              steps=v["steps"], guidance=v["guidance"], size=v["size"])
    except ValueError as e:
        return None, {"size" if "--size" in str(e) else "general": one_line(e)}
    try:
        tiles = check_scan(session.pipe, sweep, base)
        unique = len({t.recipe.key for t in tiles})
        guards.check_job_size(unique, base.steps, base.width, base.height, False)
    except ValueError as e:
        return None, {"general": one_line(e)}
    if v["folder"] is None:
        digest = hashlib.sha1(json.dumps([repr(sweep), base.to_dict()]).encode()).hexdigest()[:10]
        v["folder"] = session.out_dir / f"scan-{digest}"
    view = ScanView.plan(sweep, base, tiles, session.short_names, v["folder"],
                         scan_command(model, form, v["folder"]))
    view.form = form
    return view, {}


def wire(session, ui, stack) -> None:
    """Events of the scan tab; ``stack`` is the Stack tab (its fields receive "add to my stack")."""
    error_boxes = list(ui.errors.values())
    display = session.out_dir / ".page"  # the page's own images: placeholders, framed default tiles
    outputs = [*error_boxes, ui.progress, ui.status, ui.header, ui.gallery, ui.command, ui.sheet, ui.view]

    def updates(errors=None, **kw):
        errors = errors or {}
        out = {box: error_text(errors.get(name)) for name, box in ui.errors.items()}
        out.update({getattr(ui, k): v for k, v in kw.items()})
        return out

    def progress_html(view, job, final=False):
        state = job.state if final else "waiting" if job.state == "waiting" else "running"
        return (f'<progress id="scan-progress-bar" value="{view.done_count}" max="{view.total}"></progress> '
                f'<span id="scan-progress-text">{view.done_count}/{view.total} tiles · {state}</span>')

    def run(prompt, negative, seed, steps, guidance, size, blocks, together, start, rate, settings, folder,
            request: gr.Request):
        view, errors = plan_scan(session, prompt, negative, seed, steps, guidance, size, blocks, together, start,
                                 rate, settings, folder)
        if errors:
            yield updates(errors, status="")
            return
        title = scan_title(view.sweep, view.base)

        def work(job):
            def on_tiles(tiles):
                job.post([(t.recipe.key, t.status) for t in tiles])
                if job.cancel.is_set():  # on Ray workers the UNet hook never fires here: stop between batches
                    raise JobCancelled()

            return run_scan(session.pipe, view.sweep, view.base, out=view.folder, progress=False, title=title,
                            on_tiles=on_tiles, executor=session.executor)

        job = session.queue.submit("scan", request.session_hash if request else "", work)
        ahead = session.queue.ahead_of(job)
        grid = gr.Gallery(value=view.gallery(display), columns=view.columns)
        yield updates(header=view.header, gallery=grid, command=view.command, view=view, sheet=None,
                      progress=progress_html(view, job),
                      status=f"{session.queue.describe()}" + (f" — {ahead} job(s) ahead of yours" if ahead else ""))
        while not job.finished:
            events = job.drain(0.2)
            for keys in events:
                view.finish(keys)
            if events or job.state == "waiting":
                grid = gr.Gallery(value=view.gallery(display), columns=view.columns) if events else gr.update()
                yield updates(gallery=grid, progress=progress_html(view, job),
                              status=session.queue.describe())
        for keys in job.drain(0):
            view.finish(keys)
        if job.state == "done":
            result = job.result
            status = (f"rendered {result.rendered} of {view.total} images ({view.total - result.pending_count} "
                      f"already done) in {view.folder}")
            if result.failed:
                status += f"; {len(result.failed)} tile(s) came out non-finite (NaN/inf), not written"
            sheet = str(result.sheet_files[0]) if result.sheet_files else None
            yield updates(gallery=view.gallery(display), progress=progress_html(view, job, True), status=status, sheet=sheet,
                          view=view)
        elif job.state == "cancelled":
            yield updates(gallery=view.gallery(display), progress=progress_html(view, job, True), view=view,
                          status=f"cancelled: {view.done_count} of {view.total} tiles kept in {view.folder}; "
                                 "Run again (or the command below) to continue")
        else:
            yield updates({"general": one_line(job.error)}, progress=progress_html(view, job, True), view=view,
                          status="failed")

    inputs = [ui.prompt, ui.negative, ui.seed, ui.steps, ui.guidance, ui.size, ui.blocks, ui.together, ui.start,
              ui.rate, ui.settings, ui.folder]
    ui.run.click(run, inputs, outputs, concurrency_limit=None)

    def cancel(request: gr.Request):
        n = session.queue.cancel(request.session_hash if request else "")
        return f"cancelling {n} job(s)…" if n else "nothing to cancel"

    ui.cancel.click(cancel, None, ui.status, concurrency_limit=None, queue=False)

    def select(view, evt: gr.SelectData):
        if view is None:
            return {ui.tile_text: "run a scan first"}
        view.selected = evt.index
        cell = view.cells[evt.index]
        path = view.path(cell)
        recipe = cell.tile.recipe
        done = view.status.get(recipe.key) == "done"
        text = f"{cell.caption} — " + ("; ".join(mod_texts(recipe, session.short_names)) or "default (no mods)")
        return {ui.tile: str(path) if done else None, ui.download: str(path) if done else None,
                ui.tile_text: text if done else text + " (not rendered yet)",
                ui.recipe: json.dumps(recipe.to_dict(), indent=1), ui.view: view}

    ui.gallery.select(select, ui.view, [ui.tile, ui.download, ui.tile_text, ui.recipe, ui.view], queue=False)

    def chosen(view):
        if view is None or view.selected is None:
            raise gr.Error("click a tile first")
        return view.cells[view.selected]

    def finer(view):
        cell = chosen(view)
        sched = view.schedule_of(cell)
        axes = view.sweep.axes()
        starts = axes.get("start", [sched.start])
        rates = axes.get("rate", [sched.rate])
        return {ui.start: finer_range(starts, sched.start), ui.rate: finer_range(rates, sched.rate),
                ui.settings: "", ui.folder: "", ui.seed: str(cell.tile.recipe.seed),
                ui.blocks: [cell.tile.coords["block"]], ui.together: False}

    def other_seeds(view):
        cell = chosen(view)
        seed = cell.tile.recipe.seed
        return {ui.settings: view.schedule_of(cell).to_text(), ui.folder: "",
                ui.seed: ",".join(str(seed + i) for i in range(4)), ui.blocks: [cell.tile.coords["block"]],
                ui.together: False}

    form_outputs = [ui.start, ui.rate, ui.settings, ui.folder, ui.seed, ui.blocks, ui.together]
    ui.finer.click(finer, ui.view, form_outputs, queue=False).success(run, inputs, outputs,
                                                                      concurrency_limit=None)
    ui.seeds.click(other_seeds, ui.view, form_outputs, queue=False).success(run, inputs, outputs,
                                                                            concurrency_limit=None)

    def add(view, mods):
        cell = chosen(view)
        r = cell.tile.recipe
        lines = [m for m in (mods or "").splitlines() if m.strip()] + mod_texts(r, session.short_names)
        return {stack.mods: "\n".join(dict.fromkeys(lines)), stack.prompt: r.prompt, stack.negative: r.negative_prompt,
                stack.seed: str(r.seed), stack.steps: str(r.steps), stack.guidance: f"{r.guidance:g}",
                stack.size: f"{r.width}x{r.height}",
                ui.status: f"added {', '.join(mod_texts(r, session.short_names)) or 'nothing (default tile)'} "
                           "to the stack (Stack / generate tab)"}

    ui.add.click(add, [ui.view, stack.mods], [stack.mods, stack.prompt, stack.negative, stack.seed, stack.steps,
                                              stack.guidance, stack.size, ui.status], queue=False)

    def restore(path):
        if not path:
            return {}
        try:
            recipe = Recipe.from_png(path)
        except ValueError as e:
            return {ui.errors["general"]: error_text(one_line(e))}
        blocks = [session.short_names.get(n, n) for n, _ in recipe.mods]
        settings = list(dict.fromkeys(s.to_text() for _, s in recipe.mods))
        return {ui.prompt: recipe.prompt, ui.negative: recipe.negative_prompt, ui.seed: str(recipe.seed),
                ui.steps: str(recipe.steps), ui.guidance: f"{recipe.guidance:g}",
                ui.size: f"{recipe.width}x{recipe.height}", ui.blocks: blocks or [session.default_block],
                ui.together: len(blocks) > 1 and len(settings) == 1, ui.settings: "\n".join(settings[:1]),
                ui.folder: "", ui.recipe: json.dumps(recipe.to_dict(), indent=1),
                ui.errors["general"]: "", ui.status: f"restored the recipe of {path.rsplit('/', 1)[-1]}"}

    ui.drop.upload(restore, ui.drop, [ui.prompt, ui.negative, ui.seed, ui.steps, ui.guidance, ui.size, ui.blocks,
                                      ui.together, ui.settings, ui.folder, ui.recipe, ui.errors["general"],
                                      ui.status], queue=False)
