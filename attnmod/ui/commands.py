"""Run an ``attnmod`` command on the page's loaded model: the same parser, checks, files and messages as the
command line, so a tab that runs ``attnmod maps`` writes exactly what the CLI writes."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

from ..cli import COMMANDS, _glue_negative_values, build_parser
from .forms import one_line


class CommandError(ValueError):
    """A command's one-line error, as the CLI prints it after ``attnmod <command>: error:``."""


def parse(argv: list[str]) -> SimpleNamespace:
    """``argv`` parsed as the CLI parses it; CommandError with argparse's message for a bad value."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(_glue_negative_values(argv))
    except SystemExit:
        last = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments"
        raise CommandError(last.split(": error: ", 1)[-1]) from None


def run(args, pipe, executor=None) -> tuple[str, str]:
    """Run the parsed command on ``pipe``; (stdout, stderr). Its errors are raised as CommandError. ``executor``
    (the page's ``--ray``) renders what the command would render with ``--ray`` (influence, strategy); it stays
    open for the next command."""
    args.pipeline, args.quiet, args.executor = pipe, True, executor
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = COMMANDS[args.command](args) or 0
    except (ValueError, FileNotFoundError) as e:
        raise CommandError(one_line(e)) from None
    if code:
        raise CommandError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {code}")
    return out.getvalue(), err.getvalue()
