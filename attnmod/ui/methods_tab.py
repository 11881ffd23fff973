"""The method tabs — Influence, Strategy, Maps, Edit, Style, Transfer, Layout, Panorama — each the form of one
``attnmod`` command run on
the loaded model (``commands``), showing the files the command wrote. A bad value's error (the CLI's line)
appears under the field whose flag it names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from PIL import Image

from ..grid import cell_box
from ..tokenizer import split_words
from . import commands
from .forms import error_text, field_for, one_line
from .scan_tab import EXAMPLE

EDIT_TO = "a large red circle in the center, on a striped blue background, flat style"
LAYOUT_PROMPT = "a large red circle, a large blue square, on a plain white background, flat style"


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    flag: str
    default: str = ""
    kind: str = "text"  # text | lines (the flag repeated, one value per line) | choice | image | check
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    command: str  # the attnmod command
    title: str
    about: str
    fields: tuple[Field, ...]
    out_file: str = ""  # --out is this file in the job's folder (else the folder itself)
    images: tuple[str, ...] = ()  # files of the folder shown, in order
    extra: dict = field(default_factory=dict)


def _sampling(seed="1") -> tuple[Field, ...]:
    return (Field("negative", "negative prompt", "--negative-prompt"), Field("seed", "seed", "--seed", seed),
            Field("steps", "steps (empty: the model's)", "--steps"))


METHODS = (
    Method("influence", "Influence", "Every block's tile at one AttnMod setting next to the default image, scored by "
           "mean |pixel change| and ranked. Click a block to scan it; the Scan tab's block list shows the ranks.",
           (Field("prompt", "prompt", "--prompt", EXAMPLE), *_sampling(),
            Field("setting", "setting START:RATE[:ACCEL]", "--setting", "-5:0.2"),
            Field("blocks", "blocks (selector)", "--blocks", "all")),
           images=("influence.png",)),
    Method("strategy", "Strategy", "Greedy multi-block AttnMod (paper Fig. 9): every chosen block starts at 0 and "
           "one gains +1 per step, the most or least influential one.",
           (Field("prompt", "prompt", "--prompt", EXAMPLE), *_sampling(),
            Field("blocks", "candidate blocks (selector)", "--blocks", "all"),
            Field("picker", "picker", "--picker", "most", "choice", ("most", "least"))),
           out_file="strategy.png", images=("strategy.png",)),
    Method("maps", "Maps", "Cross-attention heat map per word (pick a word), self-attention PCA and the "
           "self-attention segments, labelled with the words that attend there.",
           (Field("prompt", "prompt", "--prompt", EXAMPLE), *_sampling(),
            Field("segments", "segments (k of the k-means)", "--segments", "4")),
           images=("image.png", "words.png", "self-attention-pca.png", "segments.png")),
    Method("edit", "Edit", "Prompt-to-Prompt: edit the image by editing its prompt; the layout is kept.",
           (Field("prompt", "prompt", "--prompt", EXAMPLE), Field("to", "edited prompt", "--to", EDIT_TO),
            *_sampling(), Field("cross", "cross-replace fraction (or WORD=FRACTION lines)", "--cross-replace",
                                "0.8", "lines"),
            Field("self", "self-replace fraction", "--self-replace", "0.4"),
            Field("refine", "refine (the edit adds words)", "--refine", "", "check")),
           images=("side-by-side.png", "source.png", "edit.png")),
    Method("style", "Style", "StyleAligned: a set of images sharing the first one's style, or a real reference "
           "image's (upload it: it is DDIM-inverted; it must have the model's size).",
           (Field("prompt", "prompts, one per line (the first is the reference)", "--prompt", EXAMPLE + "\n" + EDIT_TO,
                  "lines"),
            Field("style", "style words appended to every prompt", "--style"), *_sampling("0"),
            Field("blocks", "self-attention blocks that share (selector)", "--blocks", "self"),
            Field("ref_image", "reference image (optional)", "--ref-image", "", "image"),
            Field("ref_prompt", "what the reference image shows", "--ref-prompt")),
           images=("grid.png",)),
    Method("transfer", "Transfer", "Cross-Image Attention: the structure image's layout and shapes in the appearance "
           "image's colours and textures (upload both, or generate them from prompts).",
           (Field("structure", "structure image", "--structure", "", "image"),
            Field("appearance", "appearance image", "--appearance", "", "image"),
            Field("structure_prompt", "or generate the structure from this prompt", "--structure-prompt", EXAMPLE),
            Field("appearance_prompt", "or generate the appearance from this prompt", "--appearance-prompt",
                  EDIT_TO),
            Field("noun", "the object's noun (masked AdaIN)", "--noun"),
            Field("prompt", "prompt of the inversions and the transfer (empty: the model's)", "--prompt"),
            Field("seed", "seed of the inversions", "--seed", "42"),
            Field("option", "TransferOptions, NAME=VALUE per line (e.g. steps=50)", "--option", "", "lines")),
           images=("side-by-side.png", "output.png")),
    Method("layout", "Layout", "Bounded Attention (or layout guidance): each subject inside its box. One subject "
           "per line, its words as in the prompt and its box X0,Y0,X1,Y1 (0-1, top-left origin). On the embedded "
           "models, start the page with --model toy-layout: the default toy model draws objects only where its "
           "prompt names a place.",
           (Field("prompt", "prompt", "--prompt", LAYOUT_PROMPT),
            Field("box", "subjects, one per line: WORDS=X0,Y0,X1,Y1", "--box",
                  "red circle=0.05,0.3,0.45,0.7\nblue square=0.55,0.3,0.95,0.7", "lines"),
            Field("method", "method", "--method", "bounded", "choice", ("bounded", "guidance", "none")),
            *_sampling("0"),
            Field("option", "BoundedOptions, NAME=VALUE per line (e.g. guidance_steps=10)", "--option", "", "lines")),
           images=("overlay.png", "image.png")),
    Method("panorama", "Panorama", "MultiDiffusion: a wide image from overlapping windows, optionally in the style "
           "of generated references (one per line: anchored from left to right).",
           (Field("prompt", "prompt", "--prompt", "a large red circle"),
            Field("width", "width in pixels (the window's plus a multiple of its stride)", "--width", "256"),
            Field("style_prompt", "style references, one prompt per line (optional)", "--style-prompt", "",
                  "lines"),
            *_sampling("0"),
            Field("option", "StyleAlignedOptions, NAME=VALUE per line (e.g. query_chunk=1024)", "--option", "",
                  "lines")),
           images=("panorama.png",)),
)


def build_all(session) -> dict[str, SimpleNamespace]:
    uis = {}
    for m in METHODS:
        with gr.Tab(m.title, id=m.command, elem_id=f"tab-{m.command}"):
            uis[m.command] = _build(session, m)
    return uis


def _build(session, m: Method) -> SimpleNamespace:
    ui = SimpleNamespace(method=m, inputs={}, errors={})
    gr.Markdown(m.about)
    with gr.Row():
        with gr.Column(scale=1):
            for f in m.fields:
                eid = f"{m.command}-{f.name}"
                if f.kind == "choice":
                    comp = gr.Radio(list(f.choices), value=f.default, label=f.label, elem_id=eid)
                elif f.kind == "image":
                    comp = gr.File(label=f.label, file_types=["image"], type="filepath", elem_id=eid)
                elif f.kind == "check":
                    comp = gr.Checkbox(label=f.label, value=False, elem_id=eid)
                else:
                    comp = gr.Textbox(label=f.label, value=f.default, lines=2 if f.kind == "lines" else 1,
                                      elem_id=eid)
                ui.inputs[f.name] = comp
                ui.errors[f.name] = gr.Markdown("", elem_id=f"{eid}-error", elem_classes=["field-error"])
            with gr.Row():
                ui.run = gr.Button(f"Run {m.command}", variant="primary", elem_id=f"{m.command}-run")
                ui.cancel = gr.Button("Cancel", elem_id=f"{m.command}-cancel")
            ui.errors["general"] = gr.Markdown("", elem_id=f"{m.command}-general-error", elem_classes=["field-error"])
            ui.status = gr.Markdown("", elem_id=f"{m.command}-status")
            ui.log = gr.Textbox(label="what the command printed", interactive=False, lines=3,
                                elem_id=f"{m.command}-log")
        with gr.Column(scale=2):
            ui.gallery = gr.Gallery(label="results (the files the CLI writes)", columns=2, format="png",
                                    elem_id=f"{m.command}-results", height="auto", object_fit="contain")
            ui.files = gr.File(label="download", file_count="multiple", interactive=False,
                               elem_id=f"{m.command}-files")
            if m.command == "influence":
                ui.ranked = gr.Gallery(label="blocks by influence (click one to scan it)", columns=8, format="png",
                                       allow_preview=False, elem_id="influence-ranked", height="auto")
            if m.command == "maps":
                ui.word = gr.Dropdown([], label="word", elem_id="maps-word", interactive=True)
                ui.word_map = gr.Image(label="heat map of the word", interactive=False, elem_id="maps-word-map",
                                       height=256)
    ui.folder = gr.State(None)
    return ui


def _argv(m: Method, values: dict, folder: Path, model: str) -> list[str]:
    argv = [m.command, "--model", model]  # the page's model: recipes name it, its grammar checks apply
    for f in m.fields:
        v = values[f.name]
        if f.kind == "check":
            argv += [f.flag] if v else []
        elif f.kind == "lines":
            argv += [a for line in str(v or "").splitlines() if line.strip() for a in (f.flag, line.strip())]
        elif v not in (None, "") and str(v).strip():
            argv += [f.flag, str(v).strip()]
    return argv + ["--out", str(folder / m.out_file if m.out_file else folder)]


def wire_all(session, uis, scan, tabs) -> None:
    for ui in uis.values():
        _wire(session, ui, scan, tabs)


def _wire(session, ui, scan, tabs) -> None:
    m = ui.method
    names = [f.name for f in m.fields]
    flags = {f.flag: f.name for f in sorted(m.fields, key=lambda f: -len(f.flag))}
    extra_outputs = []
    if m.command == "influence":
        extra_outputs = [ui.ranked, scan.blocks]
    if m.command == "maps":
        extra_outputs = [ui.word]
    outputs = [*ui.errors.values(), ui.status, ui.log, ui.gallery, ui.files, ui.folder, *extra_outputs]

    def updates(errors=None, **kw):
        out = {box: error_text((errors or {}).get(name)) for name, box in ui.errors.items()}
        out.update({getattr(ui, k): v for k, v in kw.items()})
        return out

    def run(data: dict, request: gr.Request):  # inputs given as a set: one dict of component -> value
        values = {name: data[ui.inputs[name]] for name in names}
        folder = session.new_folder(m.command)
        try:
            parsed = commands.parse(_argv(m, values, folder, session.model))
        except commands.CommandError as e:
            yield updates({field_for(str(e), flags) or "general": str(e)})
            return
        job = session.queue.submit(m.command, request.session_hash if request else "",
                                   lambda job: commands.run(parsed, session.pipe, session.executor))
        while not job.finished:
            job.drain(0.25)
            yield updates(status=f"{session.queue.describe()} · {job.unet_calls} UNet calls")
        if job.state != "done":
            message = one_line(job.error) if job.state == "failed" else None
            yield updates({field_for(message, flags) or "general": message} if message else None,
                          status=job.state)
            return
        stdout, stderr = job.result
        shown = [str(folder / name) for name in m.images if (folder / name).is_file()]
        files = sorted(str(p) for p in folder.glob("*.png"))
        out = updates(status=f"done: {folder}", log=(stdout + stderr).strip(), gallery=shown, files=files,
                      folder=str(folder))
        out.update(_after(session, ui, scan, folder, values))
        yield out

    ui.run.click(run, set(ui.inputs.values()), outputs, concurrency_limit=None)

    def cancel(request: gr.Request):
        return f"cancelling {session.queue.cancel(request.session_hash if request else '')} job(s)…"

    ui.cancel.click(cancel, None, ui.status, queue=False)

    if m.command == "influence":
        def pick(folder, current, evt: gr.SelectData):
            ranking = json.loads((Path(folder) / "influence.json").read_text())["ranking"]
            block = ranking[evt.index]["block"]
            chosen = [b for b in (current or []) if b] + [block]
            return gr.update(value=list(dict.fromkeys(chosen))), gr.Tabs(selected="scan")

        ui.ranked.select(pick, [ui.folder, scan.blocks], [scan.blocks, tabs], queue=False)
    if m.command == "maps":
        def show_word(folder, word, prompt):
            if not folder or not word:
                return None
            words = _words(session, prompt)
            sheet = Image.open(Path(folder) / "words.png")
            image = Image.open(Path(folder) / "image.png")
            tile_px = max(128, image.width)
            title = f"cross-attention per word: {_model_prompt(session, prompt)!r}"
            return sheet.crop(cell_box(0, 1 + words.index(word), [""], tile_px=tile_px, title=title))

        ui.word.change(show_word, [ui.folder, ui.word, ui.inputs["prompt"]], ui.word_map, queue=False)


def _model_prompt(session, prompt: str) -> str:
    from ..jobs import model_prompt

    return model_prompt(session.model, prompt.strip())


def _words(session, prompt: str) -> list[str]:
    pieces = session.pipe.tokenizer.tokenize(_model_prompt(session, prompt))
    return list(dict.fromkeys(w for w, _ in split_words(pieces) if w.isalpha()))


def _after(session, ui, scan, folder: Path, values: dict) -> dict:
    """What a finished job adds beyond its files: influence ranks, the maps' word picker."""
    m = ui.method
    if m.command == "influence":
        ranking = json.loads((folder / "influence.json").read_text())["ranking"]
        session.ranks = {r["block"]: i + 1 for i, r in enumerate(ranking)}
        manifest = json.loads((folder / "manifest.json").read_text())
        by_block = {t["coords"]["block"]: folder / t["file"] for t in manifest["tiles"] if t["recipe"]["mods"]}
        items = [(str(by_block[r["block"]]), f"{i + 1}. {r['block']} {r['change']:.3f}")
                 for i, r in enumerate(ranking) if r["block"] in by_block]
        return {ui.ranked: items, scan.blocks: gr.update(choices=session.block_choices())}
    if m.command == "maps":
        return {ui.word: gr.update(choices=_words(session, values["prompt"]), value=None)}
    return {}
