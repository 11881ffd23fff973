"""StyleAligned (Hertz et al. 2024): a batch that follows one reference image's style via shared attention.

In the chosen self-attention layers every target image also attends to the reference image's keys and
values, after AdaIN of its queries and keys (optionally values) towards the reference's per-channel
statistics over tokens. GroupNorm statistics can be shared with the reference too. The reference's
index in the batch is explicit; with classifier-free guidance each half has its reference. The
reference itself is never changed (but with ``full_attention_share``): it attends to itself only, so its image
is what it would be alone.

The defaults reproduce google/style-aligned's ``sa_handler.py`` (tested rule by rule): the same layers
for ``only_self_level`` (its switch rule over diffusers' processor order: down, up, mid), the same
``full_attention_share`` (each CFG half one sequence; no AdaIN, no score scale/shift). Departures, where
the reference has no defined result: AdaIN leaves a layer with a single token unchanged (the reference's
unbiased variance over one token is NaN), and ``only_self_level`` switches no layer where the
reference's rule would divide by zero (fewer than one layer to switch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttentionCall, explicit_attention
from ..blocks import resolve_blocks
from ..options import with_settings


@dataclass(frozen=True)
class StyleAlignedOptions:
    """The published defaults; ``blocks`` restricts sharing (our block selectors, e.g. ``U*``).

    ``full_attention_share``: every image of a CFG half — the reference included, which then changes too —
    attends to all the half's tokens, each once; AdaIN and the score scale/shift do not apply (as in the
    reference). ``only_self_level``: that fraction of the shared layers stays unshared (``unshared_layers``).

    ``share_layer_norm`` is kept for parity with the reference implementation, which concatenates the
    reference's tokens before each LayerNorm; LayerNorm normalises every token on its own, so this
    changes nothing and attnmod does not hook LayerNorms. ``share_group_norm`` computes every
    GroupNorm's statistics over the image's and the reference's positions together.
    """

    share_attention: bool = True
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    share_group_norm: bool = True
    share_layer_norm: bool = True
    full_attention_share: bool = False
    shared_score_scale: float = 1.0
    shared_score_shift: float = 0.0
    only_self_level: float = 0.0
    blocks: str = "self"
    reference: int = 0

    def __post_init__(self):
        if not 0 <= self.only_self_level <= 1:
            raise ValueError(f"only_self_level is a fraction in [0, 1], got {self.only_self_level}")
        if self.reference < 0:
            raise ValueError("the reference index must be >= 0")

    def with_settings(self, pairs: list[str]) -> StyleAlignedOptions:
        """A copy with ``"name=value"`` settings applied (the CLI's ``--option``), e.g. ``adain_values=true``."""
        return with_settings(self, pairs)


def calc_mean_std(feat: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over tokens (unbiased variance, as the reference). feat: (B, h, N, d), N >= 2
    -> two (B, h, 1, d)."""
    return feat.mean(dim=-2, keepdim=True), (feat.var(dim=-2, keepdim=True) + eps).sqrt()


def adain(feat: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """AdaIN: give ``feat`` the per-channel token statistics of ``ref``. Both (B, h, N, d).

    A layer with a single token has no token statistics (the unbiased variance of one value is NaN): it is
    returned unchanged (a departure from the reference, whose images come out NaN there)."""
    if feat.shape[-2] < 2 or ref.shape[-2] < 2:
        return feat
    mean, std = calc_mean_std(feat)
    ref_mean, ref_std = calc_mean_std(ref)
    return (feat - mean) / std * ref_std + ref_mean


def reference_rows(batch: int, images: int, reference: int) -> torch.Tensor:
    """For each row of a batch of ``batch`` = images × copies (CFG), the row of its copy's reference."""
    if reference >= images:
        raise ValueError(f"reference index {reference} but the batch has {images} images")
    return torch.tensor([reference + (i // images) * images for i in range(batch)])


class SharedAttention:
    """The q/k/v hook of one shared self-attention layer."""

    def __init__(self, options: StyleAlignedOptions, images: int):
        self.o = options
        self.images = images

    def __call__(self, call: AttentionCall, q, k, v):
        o = self.o
        if o.full_attention_share:  # one sequence per CFG copy, as the reference: no AdaIN, no scale/shift
            return q, self._whole_copy(k), self._whole_copy(v), None
        batch = q.shape[0]
        ref = reference_rows(batch, self.images, o.reference).to(q.device)
        is_ref = torch.zeros(batch, dtype=torch.bool, device=q.device)
        is_ref[ref] = True
        if o.adain_queries:
            q = torch.where(is_ref[:, None, None, None], q, adain(q, q[ref]))
        if o.adain_keys:
            k = torch.where(is_ref[:, None, None, None], k, adain(k, k[ref]))
        if o.adain_values:
            v = torch.where(is_ref[:, None, None, None], v, adain(v, v[ref]))
        if not o.share_attention:
            return q, k, v, None
        n = k.shape[-2]
        extra_k, extra_v = k[ref] * o.shared_score_scale, v[ref]
        bias = torch.zeros(batch, 1, 1, n + extra_k.shape[-2], dtype=q.dtype, device=q.device)
        bias[..., n:] = o.shared_score_shift
        bias[is_ref, ..., n:] = float("-inf")  # the reference attends to itself only
        return q, torch.cat([k, extra_k], dim=-2), torch.cat([v, extra_v], dim=-2), bias

    def _whole_copy(self, t: torch.Tensor) -> torch.Tensor:
        """(B, h, N, d) -> (B, h, images*N, d): each row gets the tokens of every image of its copy (CFG half),
        each once: the reference's ``(k b) n d -> k (b n) d``, for any number of copies."""
        copies, (h, n, d) = t.shape[0] // self.images, t.shape[1:]
        per_copy = t.view(copies, self.images, h, n, d).permute(0, 2, 1, 3, 4).reshape(copies, h, -1, d)
        return per_copy.repeat_interleave(self.images, dim=0)


def unshared_layers(count: int, level: float) -> list[bool]:
    """Which of ``count`` self-attention layers (in diffusers' processor order) stay unshared at
    ``only_self_level``: the reference's rule. n = int(level · count) layers, every (count // n)-th from the
    first; above 0.5 the complement of that rule at 1 − level; 0: none; 1: all. Where n is 0 the reference
    divides by zero; here no layer is switched (none unshared below 0.5, all above)."""
    if level <= 0 or level >= 1:
        return [level >= 1] * count
    flip = level > 0.5
    if flip:
        level = 1 - level
    n = int(level * count)
    picked = [n > 0 and i % (count // n) == 0 for i in range(count)]
    return [not p for p in picked] if flip else picked


def _shared_layers(unet, options: StyleAlignedOptions) -> list[str]:
    chosen = {b.name for b in resolve_blocks(unet, options.blocks) if b.kind == "self"}
    if not chosen:
        raise ValueError(f"no self-attention blocks match {options.blocks!r}")
    # diffusers' processor order (down, up, mid: the mid block registers last), which the reference counts in
    names = [key.removesuffix(".processor") for key in unet.attn_processors]
    names = [n for n in names if n in chosen]
    unshared = unshared_layers(len(names), options.only_self_level)
    return [n for n, skip in zip(names, unshared, strict=True) if not skip]


class style_aligned:  # noqa: N801 - a context manager used like a function
    """``with style_aligned(pipe, images=4): pipe(prompts)`` — the batch follows image 0's style."""

    def __init__(self, pipe, images: int, options: StyleAlignedOptions = StyleAlignedOptions()):
        self.unet = getattr(pipe, "unet", pipe)
        self.options = options
        self.images = images
        reference_rows(images, images, options.reference)  # validates the index
        self.layers = _shared_layers(self.unet, options)
        self._attention = None
        self._norm_handles = []

    def _group_norm_hook(self, module, args, output):
        x = args[0]  # (B, C, ...)
        ref = reference_rows(x.shape[0], self.images, self.options.reference).to(x.device)
        joint = torch.cat([x, x[ref]], dim=-1)  # statistics over own and reference positions
        return F.group_norm(joint, module.num_groups, module.weight, module.bias, module.eps)[..., : x.shape[-1]]

    def __enter__(self):
        hook = SharedAttention(self.options, self.images)
        self._attention = explicit_attention(self.unet, {}, {n: hook for n in self.layers}).__enter__()
        if self.options.share_group_norm:
            for module in self.unet.modules():
                if isinstance(module, torch.nn.GroupNorm):
                    self._norm_handles.append(module.register_forward_hook(self._group_norm_hook))
        return self

    def __exit__(self, *exc):
        for h in self._norm_handles:
            h.remove()
        self._norm_handles = []
        if self._attention is not None:
            self._attention.__exit__(*exc)
            self._attention = None


def generate_style_set(pipe, prompts: list[str], *, seed: int = 0, steps: int = 20, guidance: float = 7.5,
                       width: int | None = None, height: int | None = None,
                       options: StyleAlignedOptions = StyleAlignedOptions(), reference_image=None,
                       reference_prompt: str | None = None):
    """Images (N, H, W, 3) for ``prompts`` sharing one style; image ``i`` uses seed ``seed + i``.

    The reference is ``prompts[options.reference]``, or — with ``reference_image`` (a PIL image) and its
    describing ``reference_prompt`` — that image, DDIM-inverted and replayed in slot 0 (returned first).
    """
    import numpy as np

    from ..inversion.ddim import ddim_invert, replay_reference

    if not prompts:
        raise ValueError("a style set needs at least one prompt")
    extra = {}
    if reference_image is not None:
        if not reference_prompt:
            raise ValueError("a reference image needs --ref-prompt describing it (used for its inversion)")
        trajectory = ddim_invert(pipe, reference_image, reference_prompt, steps=steps)
        prompts = [reference_prompt, *prompts]
        options = StyleAlignedOptions(**{**options.__dict__, "reference": 0})
        noise = [torch.randn(trajectory[-1].shape[1:], generator=torch.Generator().manual_seed(seed + i))
                 for i in range(1, len(prompts))]
        extra = {"latents": torch.stack([trajectory[-1][0].cpu(), *noise]).to(pipe.unet.device, pipe.unet.dtype),
                 "callback_on_step_end": replay_reference(trajectory, 0)}
    else:
        extra = {"generator": [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]}
    with style_aligned(pipe, images=len(prompts), options=options), torch.inference_mode():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                   output_type="np", **extra)
    return np.asarray(out.images, dtype=np.float32)
