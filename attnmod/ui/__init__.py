"""``attnmod ui``: the attention explorer, a local web page (Gradio, the optional extra ``attnmod[ui]``).

Only this package imports Gradio; ``serve`` says how to install it when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

INSTALL_HINT = 'the web page needs Gradio: pip install "attnmod[ui]"'


def require_gradio():
    """Gradio, with analytics off; a one-line ImportError saying how to install it when it is missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return gradio


def create(model: str | None = None, out_dir: str | Path = "attnmod-ui", device=None, dtype=None, executor=None,
           **speed):
    """(page, session): the Gradio Blocks for ``model`` and the session holding its pipeline and job queue.

    ``speed``: ``compile``, ``offload``, ``vae_tiling`` for ``load_pipeline``. ``executor``: renders the page's
    scans, influence maps and strategies (``attnmod.distributed.RayExecutor``; None: here)."""
    require_gradio()
    from .app import build_app
    from .session import Session

    session = Session.load(model, out_dir, device=device, dtype=dtype, **speed)
    session.executor = executor
    return build_app(session), session


def launch(demo, session, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Serve ``demo`` on ``host:port`` (local only by default, no share link, no analytics)."""
    from .app import CSS, theme

    session.out_dir.mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=8)
    return demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                       allowed_paths=[str(session.out_dir.resolve())], theme=theme(), css=CSS, quiet=True,
                       footer_links=[], ssr_mode=False, inbrowser=False)
