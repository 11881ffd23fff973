"""Attention-block names: the paper's short names (``U1A1A2``), full diffusers names, and patterns.

A UNet attention block is one ``Attention`` module inside a transformer block, addressed in diffusers
by its processor key ``up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor``. The AttnMod
paper shortens it to ``U1A1A2``: {D|M|U}{block}A{attention}[T{transformer}]A{1|2}. The transformer
index appears only where an attention module holds several transformer blocks (SDXL).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections import Counter
from dataclasses import dataclass

_FULL = re.compile(
    r"^(?P<part>down_blocks|mid_block|up_blocks)(?:\.(?P<block>\d+))?\.attentions\.(?P<attn>\d+)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.attn(?P<kind>[12])$"
)
_SHORT = re.compile(r"^(?P<part>[DMU])(?P<block>\d+)A(?P<attn>\d+)(?:T(?P<tb>\d+))?A(?P<kind>[12])$")
_PART = {"down_blocks": "D", "mid_block": "M", "up_blocks": "U"}
_PART_INV = {v: k for k, v in _PART.items()}
_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
GROUPS = ("all", "self", "cross")


@dataclass(frozen=True)
class Block:
    """One attention block: ``short`` (U1A1A2), ``name`` (module path, no ``.processor``), ``kind``."""

    short: str
    name: str
    kind: str  # "self" (attn1) or "cross" (attn2)

    @property
    def processor_key(self) -> str:
        return self.name.partition(":")[0] + ".processor"  # DiT names carry a stream: ``...attn:image``


def _module_names(model) -> list[str]:
    """Attention module paths of a UNet (or anything with ``attn_processors``), in model order."""
    unet = getattr(model, "unet", model)
    return [key.removesuffix(".processor") for key in unet.attn_processors]


def short_name(name: str, transformers_per_attention: int = 1) -> str:
    """``up_blocks.1.attentions.1.transformer_blocks.0.attn2`` -> ``U1A1A2`` (``T`` only if several)."""
    m = _FULL.match(name.removesuffix(".processor"))
    if m is None:
        return name.removesuffix(".processor")
    tb = f"T{m['tb']}" if transformers_per_attention > 1 else ""
    return f"{_PART[m['part']]}{m['block'] or 0}A{m['attn']}{tb}A{m['kind']}"


def full_name(short: str) -> str:
    """``U1A1A2`` -> ``up_blocks.1.attentions.1.transformer_blocks.0.attn2`` (``T`` defaults to 0)."""
    m = _SHORT.match(short.upper())
    if m is None:
        raise ValueError(f"not a short block name: {short!r} (expected e.g. U1A1A2 or U0A1T3A2)")
    part = _PART_INV[m["part"]]
    head = part if part == "mid_block" else f"{part}.{m['block']}"
    return f"{head}.attentions.{m['attn']}.transformer_blocks.{m['tb'] or 0}.attn{m['kind']}"


def list_blocks(model) -> list[Block]:
    """Every attention block of a UNet, DiT transformer (``dit``) or pipeline, in model order."""
    from . import dit

    if dit.is_dit(model):
        return dit.list_dit_blocks(model)
    names = _module_names(model)
    parents = Counter(n.rsplit(".transformer_blocks.", 1)[0] for n in names if _FULL.match(n))
    per_parent = {p: c // 2 for p, c in parents.items()}  # attn1 + attn2 per transformer block
    blocks = []
    for n in sorted(names, key=lambda n: _ORDER.get(n.split(".", 1)[0], 3)):  # D, M, U like the paper
        m = _FULL.match(n)
        count = per_parent.get(n.rsplit(".transformer_blocks.", 1)[0], 1) if m else 1
        kind = "cross" if n.endswith("attn2") else "self"
        blocks.append(Block(short_name(n, count), n, kind))
    return blocks


def resolve_blocks(model, selector: str | list[str]) -> list[Block]:
    """Blocks matching a selector, in model order.

    A selector is a short name (``U1A1A2``), a full name with or without ``.processor``, a group
    (``all``, ``self``, ``cross``), a glob over short or full names (``U*A2``, ``D1*``), or several of
    these joined by ``+`` or given as a list. DiT models (``dit``): ``J3I``, ``J3`` (every stream),
    ``transformer_blocks.3.attn:text``, groups ``all``, ``image``, ``text``, ``joint``, ``single``. Anything that matches nothing raises ``ValueError``
    naming the closest valid names. ``model`` may also be the list ``list_blocks`` returned.
    """
    blocks = model if isinstance(model, list) else list_blocks(model)
    parts = selector if isinstance(selector, list | tuple) else str(selector).split("+")
    chosen: set[str] = set()
    for raw in parts:
        chosen |= {b.name for b in _match_one(blocks, raw.strip())}
    return [b for b in blocks if b.name in chosen]


def _match_one(blocks: list[Block], sel: str) -> list[Block]:
    from . import dit

    low = sel.lower()
    is_dit = bool(blocks) and ":" in blocks[0].name
    if low in (dit.DIT_GROUPS if is_dit else GROUPS):
        return dit.match_group(blocks, low) if is_dit else [b for b in blocks if low == "all" or b.kind == low]
    if low in GROUPS + dit.DIT_GROUPS:
        groups = dit.DIT_GROUPS if is_dit else GROUPS
        raise ValueError(f"group {low!r} is not one of this model's: {', '.join(groups)}")
    name = sel.removesuffix(".processor")
    exact = [b for b in blocks if name in (b.name, b.short) or name.upper() == b.short]
    if not exact and is_dit:
        exact = dit.match_block(blocks, name)  # J3 / transformer_blocks.3.attn: every stream of the block
    if not exact and _SHORT.match(name.upper()):
        # an explicit T0 where the model has one transformer block per attention: U1A1T0A2 == U1A1A2
        exact = [b for b in blocks if b.name == full_name(name) and "T" not in b.short[1:]]
    if exact:
        return exact
    if any(c in name for c in "*?["):
        hits = [b for b in blocks if fnmatch.fnmatchcase(b.short, name.upper()) or fnmatch.fnmatchcase(b.name, name)]
        if hits:
            return hits
    raise ValueError(unknown_block_message(blocks, sel))


def unknown_block_message(blocks: list[Block], sel: str) -> str:
    from . import dit

    missing = dit.missing_stream_message(blocks, sel)
    if missing:
        return missing
    is_dit = bool(blocks) and ":" in blocks[0].name
    pool = [b.short for b in blocks] + [b.name for b in blocks]
    close = difflib.get_close_matches(sel.removesuffix(".processor"), pool, n=5, cutoff=0.3)
    if not close and sel[:1].upper() in ("JS" if is_dit else "DMU"):
        close = [b.short for b in blocks if b.short.startswith(sel[:2].upper())][:5]
    hint = ", ".join(close) if close else ", ".join(b.short for b in blocks[:5]) + ", ..."
    groups, glob = ("all, image, text, joint, single", "J*T") if is_dit else ("all, self, cross", "U*A2")
    return (
        f"unknown attention block {sel!r}{dit.family_hint(blocks, sel)} (this model has {len(blocks)}); "
        f"closest: {hint}. Use `attnmod blocks` to list them, or a group ({groups}) or glob ({glob})."
    )


def downsampling(model) -> dict[str, int]:
    """Each attention block's downsampling factor against the latent (1: the latent's own resolution), read
    from a UNet's down/up samplers (mid: the deepest). Empty for models without UNet blocks."""
    unet = getattr(model, "unet", model)
    factors: dict[str, int] = {}
    f = 1
    for part in ("down_blocks", "mid_block", "up_blocks"):
        blocks = getattr(unet, part, None)
        if blocks is None:
            continue
        for i, block in enumerate([blocks] if part == "mid_block" else blocks):
            head = part if part == "mid_block" else f"{part}.{i}"
            for name, _ in block.named_modules():
                if name.endswith((".attn1", ".attn2")) and ".transformer_blocks." in name:
                    factors[f"{head}.{name}"] = f
            if getattr(block, "downsamplers", None):
                f *= 2
            if getattr(block, "upsamplers", None):
                f //= 2
    return factors
