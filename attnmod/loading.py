"""Load a pipeline from a hub id, a local diffusers folder, a single ``.safetensors`` file, or by alias.

Aliases: ``toy`` (the default) is the small model shipped inside the package, ``toy-layout`` its fine-tune that
also draws objects at places its prompt does not name (for layout control); ``tiny``, ``tiny-sdxl``,
``tiny-sd3`` and ``tiny-flux`` build random tiny pipelines in-process (no weights, for demos and tests).
SD3 / SD3.5 and FLUX folders and hub ids load through ``DiffusionPipeline`` like any other; single files are
told apart by their keys (``checkpoint_kind``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

EMBEDDED = {"toy": Path(__file__).parent / "models" / "toy",  # shipped inside the package (docs/MODEL_CARD.md)
            "toy-layout": Path(__file__).parent / "models" / "toy-layout"}
EMBEDDED_MODEL = EMBEDDED["toy"]
DEFAULT_MODEL = "toy"
TINY = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux")


class ModelLoadError(ValueError):
    """A model could not be found or read; the message says which and why."""


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


SINGLE_FILE_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                         "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def best_device(device: str | None = None, dtype: str | torch.dtype | None = None) -> tuple[str, torch.dtype]:
    """Defaults: CUDA with fp16, else MPS with fp16, else CPU with fp32."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.float16
    elif isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(names)}")
        dtype = names[dtype]
    return device, dtype


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (see ``SCHEDULERS``), keeping its config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers renamed ``torch_dtype`` to ``dtype``; pass whichever this version expects."""
    from diffusers.utils import deprecation_utils

    new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype" if new else "torch_dtype": dtype}


def is_sdxl_checkpoint(path: Path) -> bool:
    """An original-format single file is SDXL when it holds the second text encoder's weights."""
    return checkpoint_kind(path) == "sdxl"


def checkpoint_kind(path: Path) -> str:
    """``flux``, ``sd3``, ``sdxl`` or ``sd`` for an original-format single file, from its keys: FLUX has
    ``double_blocks``, SD3 / SD3.5 ``joint_blocks``, SDXL a second text encoder under ``conditioner``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118 (safe_open is not iterable)
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "flux"
    if any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
        return "sd3"
    return "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd"


@contextmanager
def _quiet_loading():
    """diffusers/transformers show loading bars by default, and transformers warns on the first import of
    diffusers' pipelines that its image processors would like torchvision (not a dependency: attnmod loads no
    image processor); the library does not print."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    verbosity = tlog.get_verbosity()
    for lib, _ in states:
        lib.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        for lib, was_enabled in states:
            if was_enabled:
                lib.enable_progress_bar()


def load_pipeline(model: str | None = None, *, device=None, dtype=None, scheduler: str | None = None,
                  config: str | None = None, compile: str | None = None, offload: str | None = None,
                  vae_tiling: bool = False):
    """A stock diffusers pipeline for ``model`` on ``device``/``dtype`` (see module doc for forms).

    ``config`` is a diffusers folder or hub id giving the component configs of a single-file
    checkpoint (needed offline). The safety checker is not loaded. ``compile`` (a ``torch.compile`` mode),
    ``offload`` (``model`` / ``sequential``, CUDA only) and ``vae_tiling``: see ``speed.apply_speed``; they are
    checked before anything loads.
    """
    from . import speed

    device, dtype = best_device(device, dtype)
    speed.check_speed(device, compile, offload)
    with _quiet_loading():
        pipe = _load_pipeline(model, device, dtype, scheduler, config)
    return speed.apply_speed(pipe, device, compile=compile, offload=offload, vae_tiling=vae_tiling)


def _load_pipeline(model, device, dtype, scheduler, config):
    import diffusers
    from diffusers import DiffusionPipeline

    from . import tiny
    from .dit import tiny as tiny_dit

    device, dtype = best_device(device, dtype)
    model = model or DEFAULT_MODEL
    if model in TINY:
        make = {"tiny": tiny.tiny_sd15, "tiny-sdxl": tiny.tiny_sdxl, "tiny-sd3": tiny_dit.tiny_sd3,
                "tiny-flux": tiny_dit.tiny_flux}[model]
        pipe = make()
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        path = EMBEDDED.get(model) or Path(model).expanduser()
        try:
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
                index = _index(path)
                extra = {"safety_checker": None} if "safety_checker" in index else {}
                if index.get("_class_name", "").startswith("StableDiffusion3") and None in (
                        index.get("text_encoder_3") or [None]):
                    extra.update(text_encoder_3=None, tokenizer_3=None)  # SD3 without T5 (its part: zeros)
                pipe = DiffusionPipeline.from_pretrained(path, **_dtype_kwarg(dtype), **extra)
            elif path.suffix in (".safetensors", ".ckpt"):
                if not path.is_file():
                    raise ModelLoadError(f"checkpoint file not found: {path}")
                cls = getattr(diffusers, SINGLE_FILE_PIPELINES[checkpoint_kind(path)])
                if config:
                    pipe = cls.from_single_file(str(path), config=config, **_dtype_kwarg(dtype))
                else:
                    pipe = _single_file_without_config(cls, path, dtype)
            elif model in EMBEDDED:
                raise ModelLoadError(f"the embedded model {model!r} is missing from {path}; reinstall attnmod")
            elif path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
                raise ModelLoadError(f"no model at {model!r}: not a diffusers folder, .safetensors file or hub id")
            else:
                pipe = DiffusionPipeline.from_pretrained(model, **_dtype_kwarg(dtype), safety_checker=None)
        except ModelLoadError:
            raise
        except Exception as e:  # diffusers raises OSError, ValueError, safetensors errors, ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load model {model!r}: {reason}") from e
    if scheduler:
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _single_file_without_config(cls, path: Path, dtype):
    """diffusers fetches the configs of a single file's architecture from the hub; offline that fails."""
    try:
        return cls.from_single_file(str(path), **_dtype_kwarg(dtype))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {path.name} without its configs (diffusers looked them up on the hub: "
                             f"{reason.split('. ')[0][:200]}); pass --config (config=) a local diffusers folder of the same "
                             "architecture, e.g. a saved SD1.5 pipeline") from e


def _index(path: Path) -> dict:
    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}/model_index.json is unreadable: {e}") from e


def model_reference(model: str | None) -> str:
    """What a recipe records to find ``model`` again: aliases and hub ids as given, local folders and files as
    absolute paths (so a recipe made with ``--model mycopy`` replays from any working folder)."""
    model = model or DEFAULT_MODEL
    if model in EMBEDDED or model in TINY:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def model_fingerprint(model: str | None) -> str:
    """A short id of a local model's weights: a hash of its configs, its weight files' names and sizes, and
    1 MiB from the middle of each (cheap even for multi-GB checkpoints; a fine-tune changes it). "" for hub ids
    (the id is the identity) and the in-process tiny models."""
    import hashlib

    model = model or DEFAULT_MODEL
    if model in TINY:
        return ""
    path = EMBEDDED.get(model) or Path(model).expanduser()
    if not path.exists():
        return ""
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()
                   and (path.is_file() or not any(part.startswith(".") for part in p.relative_to(path).parts))
                   and p.name != "attnmod_defaults.json")
    digest = hashlib.sha1()
    for p in files:
        rel = p.name if path.is_file() else str(p.relative_to(path))
        size = p.stat().st_size
        digest.update(f"{rel}:{size};".encode())
        if p.suffix in (".json", ".txt"):
            digest.update(p.read_bytes())
        elif p.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
            with open(p, "rb") as f:
                f.seek(max(0, size // 2 - (1 << 19)))
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]
