"""The page: one tab per way of looking at the model's attention, each a thin layer over the library."""

from __future__ import annotations

import gradio as gr

from . import methods_tab, scan_tab, stack_tab

CSS = """
.field-error p { color: #c62828; font-weight: 600; margin: 0; }
.field-error:empty { display: none; }
footer { display: none !important; }
#scan-grid .grid-container, #influence-ranked .grid-container {
    grid-template-columns: repeat(var(--grid-cols), 128px) !important; }
#scan-grid img, #scan-tile img, #stack-image img, #maps-word-map img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # nothing fetched from the internet
MONO_FONTS = ["ui-monospace", "monospace"]


def theme():
    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def build_app(session) -> gr.Blocks:
    with gr.Blocks(title="attnmod — attention explorer", analytics_enabled=False) as demo:
        gr.Markdown(f"## attnmod attention explorer · model `{session.model}` · results in `{session.out_dir}`")
        queue_line = gr.Markdown(session.queue.describe(), elem_id="queue-line")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Scan", id="scan", elem_id="tab-scan"):
                scan = scan_tab.build(session)
            with gr.Tab("Stack / generate", id="stack", elem_id="tab-stack"):
                stack = stack_tab.build(session)
            method_uis = methods_tab.build_all(session)
        scan_tab.wire(session, scan, stack)
        stack_tab.wire(session, stack)
        methods_tab.wire_all(session, method_uis, scan, tabs)
        timer = gr.Timer(1.0)
        timer.tick(session.queue.describe, None, queue_line, queue=False, show_progress="hidden")
    return demo
