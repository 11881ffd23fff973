"""Checks made before any work starts: argument types, output locations, devices, job size.

Each failure is one line that names the flag, file or value, raised as ``argparse.ArgumentTypeError``
(parse time) or ``ValueError`` (the CLI prints ``attnmod <command>: error: ...`` and exits 2).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
# above these a job needs --yes: about an hour or more on one GPU for SD1.5-sized models
LARGE_PIXELS = 2048 * 2048  # per image
LARGE_STEPS = 20_000  # images x denoising steps


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed torch accepts, 0 .. 2**64 - 1."""
    try:
        return check_seed(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "2**64" in str(e) else f"a seed is a whole number, got {text!r}") \
            from None


def subject_box(text: str):
    """argparse type: ``WORDS=X0,Y0,X1,Y1`` -> a bounded-attention ``Subject`` (box normalised, top-left origin)."""
    from .methods.bounded import Subject

    words, sep, numbers = text.rpartition("=")
    parts = numbers.split(",")
    try:
        if not sep or len(parts) != 4:
            raise ValueError
        box = tuple(float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a box looks like 'red circle=0.05,0.3,0.45,0.7' (WORDS=X0,Y0,X1,Y1), "
                                         f"got {text!r}") from None
    try:
        return Subject(words.strip(), box)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size(text: str) -> tuple[int, int]:
    """argparse type: ``WxH`` in pixels, positive multiples of 8."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"size must be positive multiples of 8, got {text!r}")
    return w, h


def check_seed(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"a seed is a whole number from 0 to 2**64 - 1, got {value}")
    return value


def seeds(values: list[float]) -> list[int]:
    """A parsed seed axis (``0:9:10`` or ``0,1,2``) as seeds; ``0:1:3`` (0, 0.5, 1) is an error, not [0, 1]."""
    out = []
    for v in values:
        if not float(v).is_integer():
            raise ValueError(f"--seed values must be whole numbers; the range gives {v:g} "
                             "(a:b:n gives n evenly spaced values from a to b)")
        out.append(check_seed(int(v)))
    return out


def seed_values(text: str) -> list[int]:
    """The seeds of a ``--seed`` text (``0``, ``0,1,2`` or ``0:9:10``); a malformed one is an error naming the flag."""
    from .sweep import parse_values

    try:
        values = parse_values(text)
    except ValueError as e:
        raise ValueError(f"--seed: {e}") from None
    return seeds(values)


def guidance(text: str) -> float:
    """argparse type: a finite classifier-free guidance scale >= 0 (<= 1 turns guidance off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"guidance must be a finite number >= 0 (1 or less: no guidance), got {text!r}")
    return value


def factor(flag: str, item: str) -> tuple[str, float]:
    """``WORD=NUMBER`` of a repeatable flag (``--reweight red=2``), with errors naming the flag."""
    word, sep, value = item.partition("=")
    if not sep or not word.strip():
        raise ValueError(f"{flag} expects WORD=NUMBER, got {item!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{flag} {item!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{flag} {item!r}: the number must be finite")
    return word.strip(), number


# --- output locations --------------------------------------------------------------------------------

def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (or ``path`` itself) that is a file, not a folder."""
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            return p
        if not p.exists():
            return None
    return None


def _probe_writable(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a file in ``folder`` (the nearest existing one): permissions as the OS applies them."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".attnmod-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {target}: cannot write in {folder} ({e.strerror or e})") from None


def _nearest_existing(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path(".")


def check_output_file(path: str, flag: str = "--out", suffixes: tuple[str, ...] = (".png",)) -> Path:
    """An image file to write: the right extension, not a folder, not inside a file, in a writable place."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name such as {p / ('image' + suffixes[0])}")
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {path}: attnmod writes {' or '.join(suffixes)} files (the recipe lives in the "
                         f"PNG's text chunks); name it {p.with_suffix(suffixes[0]).name}")
    blocker = _blocking_file(p.parent)
    if blocker is not None:
        raise ValueError(f"{flag} {path}: {blocker} is a file, not a folder")
    _probe_writable(_nearest_existing(p.parent), flag, p)
    return p


def check_output_dir(path: str, flag: str = "--out") -> Path:
    """A folder to write into (it may exist): not a file, not inside a file, in a writable place."""
    p = Path(path)
    blocker = _blocking_file(p)
    if blocker is not None:
        what = "is a file" if blocker == p else f"is inside the file {blocker}"
        raise ValueError(f"{flag} {path} {what}; {flag} names a folder")
    _probe_writable(_nearest_existing(p), flag, p)
    return p


def describe_os_error(e: OSError) -> str:
    """One line for a failed read or write: the file, and what the OS said."""
    name = e.filename if e.filename is not None else ""
    reason = e.strerror or str(e)
    if getattr(e, "errno", None) in (27, 28):  # EFBIG, ENOSPC
        reason += " (disk full or file-size limit)"
    return f"cannot write {name}: {reason}" if name else f"input/output failed: {reason}"


# --- devices -------------------------------------------------------------------------------------

def available_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | None) -> str | None:
    """``--device``: one this torch build and machine have, else an error listing those that exist."""
    if device is None:
        return None
    import torch

    have = available_devices()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; this machine has: {', '.join(have)}") from None
    name = parsed.type if parsed.index is None else f"{parsed.type}:{parsed.index}"
    if name not in have:
        build = "" if torch.cuda.is_available() or parsed.type != "cuda" else " (this torch build has no CUDA)"
        raise ValueError(f"--device {device!r} is not available{build}; this machine has: {', '.join(have)}")
    return device


# --- job size ---------------------------------------------------------------------------------------

def check_job_size(images: int, steps: int, width: int, height: int, yes: bool) -> None:
    """Refuse (unless ``yes``) a job that would take hours or not fit in memory, saying how big it is."""
    pixels, work = width * height, images * steps
    if yes or (pixels <= LARGE_PIXELS and work <= LARGE_STEPS):
        return
    why = []
    if pixels > LARGE_PIXELS:
        why.append(f"{width}x{height} is {pixels / 1e6:.1f} megapixels per image (above {LARGE_PIXELS / 1e6:.1f})")
    if work > LARGE_STEPS:
        why.append(f"{images:,} images x {steps} steps = {work:,} denoising steps (above {LARGE_STEPS:,})")
    raise ValueError(f"this is a large job: {'; '.join(why)}. Add --yes to run it anyway")


def check_prompt_length(tokenizer, prompt: str) -> str | None:
    """A warning naming the words cut off when ``prompt`` is longer than the tokenizer's limit, else None."""
    if not prompt or tokenizer is None:
        return None
    limit = tokenizer.model_max_length - 2  # start and end tokens
    pieces = tokenizer.tokenize(prompt)
    if len(pieces) <= limit:
        return None
    from .tokenizer import split_words

    dropped = " ".join(word for word, _ in split_words(pieces[limit:]))
    return (f"warning: the prompt is {len(pieces)} tokens, the model reads {limit}; dropped: {dropped!r}")

