"""The Stack / generate tab: a list of block mods applied together to one image (the paper's multi-block
combinations), editable as ``BLOCK=START[:RATE[:ACCEL]]`` lines like ``attnmod generate --mod``; a PNG made
by attnmod dropped here restores its recipe."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import gradio as gr

from ..generate import generate
from ..jobs import base_recipe, mod_texts, parse_mods
from ..modify import normalize_mods
from ..recipe import Recipe, save_png
from .forms import check_fields, common_checks, error_text, one_line, seed_check


def build(session) -> SimpleNamespace:
    ui = SimpleNamespace(errors={})

    def box(name):
        ui.errors[name] = gr.Markdown("", elem_id=f"stack-{name}-error", elem_classes=["field-error"])

    with gr.Row():
        with gr.Column(scale=2):
            ui.prompt = gr.Textbox(label="prompt", lines=2, elem_id="stack-prompt")
            box("prompt")
            ui.negative = gr.Textbox(label="negative prompt", elem_id="stack-negative")
            box("negative")
            with gr.Row():
                for name, label, value in (("seed", "seed", "0"), ("steps", "steps", ""),
                                           ("guidance", "guidance", ""), ("size", "size WxH", "")):
                    with gr.Column(min_width=110):
                        setattr(ui, name, gr.Textbox(label=label, value=value, elem_id=f"stack-{name}"))
                        box(name)
            ui.mods = gr.Textbox(label="my stack: one block mod per line, BLOCK=START[:RATE[:ACCEL]] or "
                                       "BLOCK=[m0,m1,...] (e.g. U2A2A2=-5:0.2); all applied together", lines=5,
                                 elem_id="stack-mods")
            box("mods")
            with gr.Row():
                ui.generate = gr.Button("Generate", variant="primary", elem_id="stack-generate")
                ui.cancel = gr.Button("Cancel", elem_id="stack-cancel")
            box("general")
            ui.status = gr.Markdown("", elem_id="stack-status")
            ui.drop = gr.File(label="drop a PNG made by attnmod (or the CLI) to restore its recipe",
                              file_types=[".png"], type="filepath", elem_id="stack-drop")
        with gr.Column(scale=2):
            ui.image = gr.Image(label="image", type="filepath", interactive=False, elem_id="stack-image", height=320)
            ui.download = gr.File(label="download PNG (its recipe inside)", interactive=False,
                                  elem_id="stack-download")
            ui.recipe = gr.Code(label="recipe", language="json", interactive=False, elem_id="stack-recipe")
            ui.command = gr.Textbox(label="the same image from the command line", interactive=False,
                                    elem_id="stack-command")
    return ui


def wire(session, ui) -> None:
    model, pipe = session.model, session.pipe
    fields = [ui.prompt, ui.negative, ui.seed, ui.steps, ui.guidance, ui.size, ui.mods]
    outputs = [*ui.errors.values(), ui.status, ui.image, ui.download, ui.recipe, ui.command]

    def updates(errors=None, **kw):
        out = {box: error_text((errors or {}).get(name)) for name, box in ui.errors.items()}
        out.update({getattr(ui, k): v for k, v in kw.items()})
        return out

    def run(prompt, negative, seed, steps, guidance, size, mods, request: gr.Request):
        lines = [m.strip() for m in (mods or "").splitlines() if m.strip()]
        checks = common_checks(model, prompt, negative, steps, guidance, size)
        checks["seed"] = seed_check(seed)
        checks["mods"] = lambda: normalize_mods(pipe, parse_mods(lines))
        v, errors = check_fields(checks)
        if not errors:
            try:
                recipe, _ = base_recipe(pipe, model, v["prompt"], v["seed"], negative_prompt=v["negative"],
                                        steps=v["steps"], guidance=v["guidance"], size=v["size"])
            except ValueError as e:
                errors = {"size" if "--size" in str(e) else "general": one_line(e)}
        if errors:
            yield updates(errors)
            return
        recipe = recipe.with_mods(v["mods"])
        path = session.out_dir / "stack" / f"{recipe.key}.png"
        job = session.queue.submit("generate", request.session_hash if request else "",
                                   lambda job: save_png(generate(pipe, recipe), path, recipe, session.short_names))
        while not job.finished:
            job.drain(0.2)
            yield updates(status=f"{session.queue.describe()} · {job.unet_calls} UNet calls")
        if job.state != "done":
            yield updates({"general": one_line(job.error)} if job.state == "failed" else None,
                          status=job.state)
            return
        command = shlex.join(["attnmod", "generate", "--model", model, "--prompt", recipe.prompt,
                              "--seed", str(recipe.seed), "--steps", str(recipe.steps),
                              "--guidance", f"{recipe.guidance:g}"]
                             + [f"--mod={m}" for m in mod_texts(recipe, session.short_names)]
                             + ["--out", path.name])
        yield updates(status=f"wrote {path}", image=str(path), download=str(path),
                      recipe=json.dumps(recipe.to_dict(), indent=1), command=command)

    ui.generate.click(run, fields, outputs, concurrency_limit=None)
    def cancel(request: gr.Request):
        return f"cancelling {session.queue.cancel(request.session_hash if request else '')} job(s)…"

    ui.cancel.click(cancel, None, ui.status, queue=False)

    def restore(path):
        if not path:
            return updates()
        try:
            recipe = Recipe.from_png(path)
        except ValueError as e:
            return updates({"general": one_line(e)})
        return updates(prompt=recipe.prompt, negative=recipe.negative_prompt, seed=str(recipe.seed),
                       steps=str(recipe.steps), guidance=f"{recipe.guidance:g}", size=f"{recipe.width}x{recipe.height}",
                       mods="\n".join(mod_texts(recipe, session.short_names)),
                       recipe=json.dumps(recipe.to_dict(), indent=1),
                       status=f"restored the recipe of {path.rsplit('/', 1)[-1]}: Generate remakes the image")

    ui.drop.upload(restore, ui.drop, [*outputs, *fields], queue=False)
