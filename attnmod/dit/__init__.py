"""DiT (MM-DiT) attention blocks: SD3 / SD3.5 (``SD3Transformer2DModel``) and FLUX (``FluxTransformer2DModel``).

An MM-DiT block attends over the joined text and image tokens and hands each stream's slice of the
attention result to its own output: the image slice to ``attn.to_out[0]``, the text slice to
``attn.to_add_out``. FLUX's single-stream blocks have no output projection in the attention: its result
(text tokens first, then image tokens) is concatenated with the MLP branch before the block's ``proj_out``.

A block here is one *stream* of one attention module, named ``{kind}{index}{stream}``:

- ``J{i}I`` / ``J{i}T``: the image / text result of joint block ``transformer_blocks.{i}.attn`` (SD3, SD3.5,
  FLUX's double-stream blocks). SD3's last block has no text output (``context_pre_only``): no ``J{i}T``.
- ``J{i}I2``: SD3.5-medium's image-only second attention ``transformer_blocks.{i}.attn2`` (dual layers).
- ``S{i}I`` / ``S{i}T``: the image / text rows of FLUX single-stream block ``single_transformer_blocks.{i}.attn``.
  FLUX drops the text tokens after its last block: no ``S{last}T``.

A selector without the stream (``J3``, ``S10``, or the module path ``transformer_blocks.3.attn``) means every
stream of that block. Full names are the module path with the stream: ``transformer_blocks.3.attn:image``.

Scaling (``scale_hooks``) never replaces a processor: a forward pre-hook on ``to_out[0]`` / ``to_add_out``
scales exactly the slice the stock processor hands to it; on single blocks a forward hook on ``attn`` scales
the rows of its output before they meet the MLP branch and ``proj_out``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

STREAMS = {"I": "image", "T": "text", "I2": "image"}
DIT_GROUPS = ("all", "image", "text", "joint", "single")
_SHORT = re.compile(r"^(?P<kind>[JS])(?P<index>\d+)(?P<stream>I2|I|T)?$")
_MODULE = re.compile(r"^(?P<part>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\.(?P<attn>attn2?)$")


def denoiser(target):
    """The denoising network of a pipeline (``unet`` or ``transformer``), or ``target`` itself."""
    for attr in ("unet", "transformer"):
        net = getattr(target, attr, None)
        if net is not None:
            return net
    return target


def native_size(pipe) -> int:
    """The side of the images a pipeline makes by default (UNet: ``sample_size``; SD3 / FLUX: their default)."""
    net = denoiser(pipe)
    if is_dit(net):
        return pipe.default_sample_size * pipe.vae_scale_factor
    return net.config.sample_size * pipe.vae_scale_factor


def default_block(pipe) -> str:
    """The block a scan uses when none is given: the paper's U1A1A2, on DiT the middle joint block's image."""
    net = denoiser(pipe)
    return f"J{len(net.transformer_blocks) // 2}I" if is_dit(net) else "U1A1A2"


def require_unet(pipe, method: str) -> None:
    """A one-line error for a method that works on UNet models only, given an SD3 / FLUX pipeline."""
    if is_dit(pipe):
        raise ValueError(f"{method} works on UNet models (SD1.5, SDXL and their fine-tunes); this model is a DiT "
                         f"transformer ({type(denoiser(pipe)).__name__}): on SD3 / FLUX attnmod offers AttnMod, scans, "
                         f"influence, strategies and maps")


def is_dit(model) -> bool:
    """True for MM-DiT transformers (SD3, FLUX) and pipelines holding one."""
    net = denoiser(model)
    return hasattr(net, "transformer_blocks") and not hasattr(net, "down_blocks")


def list_dit_blocks(model) -> list:
    """Every stream of every attention module of an SD3 / FLUX transformer, in model order."""
    from ..blocks import Block

    net = denoiser(model)
    blocks = []
    for i, block in enumerate(net.transformer_blocks):
        path = f"transformer_blocks.{i}"
        blocks.append(Block(f"J{i}I", f"{path}.attn:image", "image"))
        if getattr(block.attn, "to_add_out", None) is not None:
            blocks.append(Block(f"J{i}T", f"{path}.attn:text", "text"))
        if getattr(block, "attn2", None) is not None:
            blocks.append(Block(f"J{i}I2", f"{path}.attn2:image", "image"))
    singles = getattr(net, "single_transformer_blocks", None) or []
    for i in range(len(singles)):
        path = f"single_transformer_blocks.{i}.attn"
        blocks.append(Block(f"S{i}I", f"{path}:image", "image"))
        if i < len(singles) - 1:  # the last block's text rows are dropped: scaling them changes nothing
            blocks.append(Block(f"S{i}T", f"{path}:text", "text"))
    return blocks


def split_name(name: str) -> tuple[str, str]:
    """``transformer_blocks.3.attn:text`` -> (``transformer_blocks.3.attn``, ``text``)."""
    module, _, stream = name.partition(":")
    return module, stream


def match_group(blocks: list, group: str) -> list:
    """The blocks of a DiT group: all, image, text, joint (J*), single (S*)."""
    if group == "joint":
        return [b for b in blocks if b.short.startswith("J")]
    if group == "single":
        return [b for b in blocks if b.short.startswith("S")]
    return [b for b in blocks if group == "all" or b.kind == group]


def match_block(blocks: list, sel: str) -> list:
    """Every stream of a block given without its stream (``J3``, ``transformer_blocks.3.attn``)."""
    up = sel.upper()
    if _SHORT.match(up) and not _SHORT.match(up)["stream"]:
        return [b for b in blocks if _SHORT.match(b.short)["index"] == _SHORT.match(up)["index"]
                and b.short[0] == up[0]]
    return [b for b in blocks if split_name(b.name)[0] == sel]


def missing_stream_message(blocks: list, sel: str) -> str | None:
    """A clear error for an existing block asked for a stream it does not have (``J23T`` on SD3)."""
    m = _SHORT.match(sel.upper())
    if m is None or not m["stream"] or not all(_SHORT.match(b.short) for b in blocks):
        return None
    head = f"{m['kind']}{m['index']}"
    have = [b.short for b in blocks if _SHORT.match(b.short)["kind"] + _SHORT.match(b.short)["index"] == head]
    if not have:
        return None
    why = " (the model's last block passes no text on)" if m["stream"] == "T" else ""
    return (f"block {head} has no {STREAMS[m['stream']]} output {m['stream']!r}{why}; "
            f"its streams: {', '.join(have)}")


def family_hint(blocks: list, sel: str) -> str:
    """Why a name from the other family of models does not work here ('' when it is not one)."""
    dit_model = bool(blocks) and bool(_SHORT.match(blocks[0].short))
    unet_name = bool(re.match(r"^[DMU]\d+A\d+", sel.upper())) or sel.startswith(("down_blocks", "mid_block", "up_blocks"))
    if dit_model and unet_name:
        return " (a UNet block name: this model is a DiT transformer, its blocks are J{i}I/T and S{i}I/T)"
    if not dit_model and (_SHORT.match(sel.upper()) or _MODULE.match(split_name(sel)[0])):
        return " (a DiT block name: this model is a UNet, its blocks are like U1A1A2)"
    return ""


# -- scaling --------------------------------------------------------------------------------------------
def scale_rows(hidden: torch.Tensor, multiplier: torch.Tensor, rows: slice) -> torch.Tensor:
    """``hidden`` with ``rows`` (a token slice) scaled per image, the other rows untouched.

    hidden: (B, N, C) attention result over joined tokens; multiplier: (B, 1, 1).
    """
    start, stop, _ = rows.indices(hidden.shape[1])
    return torch.cat([hidden[:, :start], hidden[:, start:stop] * multiplier, hidden[:, stop:]], dim=1)


def scale_hooks(net, name: str, multiplier: Callable[[], torch.Tensor | None],
                text_tokens: Callable[[], int]) -> list:
    """Install the hook scaling block ``name``'s stream by ``multiplier()`` ((B, 1, 1) or None: unchanged);
    returns the handles. ``text_tokens()`` is the text length of the current call (single blocks)."""
    module_name, stream = split_name(name)
    attn = net.get_submodule(module_name)

    def cast(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return m if m.dtype == like.dtype else m.to(like.dtype)

    if module_name.startswith("single_transformer_blocks."):
        def post_hook(module, args, output):
            m = multiplier()
            if m is None:
                return None
            n = text_tokens()
            return scale_rows(output, cast(m, output), slice(0, n) if stream == "text" else slice(n, None))

        return [attn.register_forward_hook(post_hook)]

    target = attn.to_add_out if stream == "text" else attn.to_out[0]

    def pre_hook(module, args):
        m = multiplier()
        if m is None:
            return None
        return (args[0] * cast(m, args[0]), *args[1:])  # the stream's (B, N, C) slice, before its projection

    return [target.register_forward_pre_hook(pre_hook)]
