"""Form fields checked one by one with the library's own checks, so each one-line error (the CLI's
wording) lands next to the control that caused it."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .. import guards
from ..jobs import model_prompt

Check = Callable[[], object]


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def check_fields(checks: dict[str, Check]) -> tuple[dict[str, object], dict[str, str]]:
    """Run each field's check; (values of the good fields, one-line error per bad field)."""
    values, errors = {}, {}
    for name, check in checks.items():
        try:
            values[name] = check()
        except (ValueError, argparse.ArgumentTypeError) as e:
            errors[name] = one_line(e)
    return values, errors


def optional(text: str | None, parse: Callable[[str], object]) -> Callable[[], object]:
    """A field that may be left empty (None: the model's default)."""
    return lambda: parse(text.strip()) if text and text.strip() else None


def prompt_check(model: str, text: str | None, required: bool = True) -> Check:
    def check():
        if required and not (text or "").strip():
            raise ValueError("give a prompt")
        return model_prompt(model, (text or "").strip())

    return check


def seed_check(text) -> Check:
    return lambda: guards.check_seed(int(str(text).strip())) if str(text).strip().isdigit() else _bad_seed(text)


def _bad_seed(text):
    raise ValueError(f"a seed is a whole number, got {str(text)!r}")


def common_checks(model: str, prompt, negative, steps, guidance, size) -> dict[str, Check]:
    """The sampling fields every tab has."""
    return {
        "prompt": prompt_check(model, prompt),
        "negative": prompt_check(model, negative, required=False),
        "steps": optional(steps, guards.positive_int),
        "guidance": optional(guidance, guards.guidance),
        "size": optional(size, guards.size),
    }


def field_for(message: str, flags: dict[str, str]) -> str | None:
    """The field a CLI error names (``--size 32x32: ...``, ``argument --seed: ...``), if any."""
    for flag, name in flags.items():
        if message.startswith(flag) or f"argument {flag}" in message or f" {flag} " in f" {message} ":
            return name
    return None


def error_text(message: str | None) -> str:
    return f"⚠ error: {message}" if message else ""
