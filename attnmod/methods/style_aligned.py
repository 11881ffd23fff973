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

With a ControlNet pipeline (``controlnet_pipeline``: diffusers' own, over the same components) the reference rows'
ControlNet residuals are zeroed, as in the authors' ControlNet demo, so the reference is what it would be without
control. A reference can be computed once and saved (``style_reference``): later batches replay its per-step
features and hold targets only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttentionCall, explicit_attention
from ..blocks import resolve_blocks
from ..dit import require_unet
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

    ``query_chunk`` (ours, not in the reference; None: all at once) evaluates the shared attention that many
    queries at a time: exact, it bounds what a kernel builds at once where PyTorch falls back to its math
    kernel (which builds every query's row of the doubled keys).
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
    query_chunk: int | None = None

    def __post_init__(self):
        if not 0 <= self.only_self_level <= 1:
            raise ValueError(f"only_self_level is a fraction in [0, 1], got {self.only_self_level}")
        if self.reference < 0:
            raise ValueError("the reference index must be >= 0")
        if self.query_chunk is not None and self.query_chunk < 1:
            raise ValueError(f"query_chunk is a number of queries >= 1 (or none: all at once), got {self.query_chunk}")

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
    if ref.shape[-2] < 2:
        return feat
    return adain_to(feat, *calc_mean_std(ref))


def adain_to(feat: torch.Tensor, ref_mean: torch.Tensor, ref_std: torch.Tensor) -> torch.Tensor:
    """AdaIN towards given statistics (B, h, 1, d) — a saved reference's; a single token: unchanged."""
    if feat.shape[-2] < 2:
        return feat
    mean, std = calc_mean_std(feat)
    return (feat - mean) / std * ref_std + ref_mean


def reference_rows(batch: int, images: int, reference: int) -> torch.Tensor:
    """For each row of a batch of ``batch`` = images × copies (CFG), the row of its copy's reference."""
    if reference >= images:
        raise ValueError(f"reference index {reference} but the batch has {images} images")
    return torch.tensor([reference + (i // images) * images for i in range(batch)])


class SharedAttention:
    """The q/k/v hook of one shared self-attention layer.

    The reference's keys, values and query statistics come from its rows of the batch, or — with ``saved`` (a
    ``style_reference.StyleReference`` being replayed) — from the saved reference at the current step, every row
    of the batch then being a target. ``recorder`` (optional) is handed the reference rows' q, k, v."""

    def __init__(self, options: StyleAlignedOptions, images: int, saved=None, recorder=None):
        self.o = options
        self.images = images
        self.saved = saved
        self.recorder = recorder

    def __call__(self, call: AttentionCall, q, k, v):
        o = self.o
        if o.full_attention_share:  # one sequence per CFG copy, as the reference: no AdaIN, no scale/shift
            return q, self._whole_copy(k), self._whole_copy(v), None
        batch = q.shape[0]
        is_ref = torch.zeros(batch, dtype=torch.bool, device=q.device)
        if self.saved is None:
            ref = reference_rows(batch, self.images, o.reference).to(q.device)
            is_ref[ref] = True
            ref_k, ref_v = k[ref], v[ref]
            q_stats = calc_mean_std(q[ref]) if o.adain_queries and q.shape[-2] > 1 else None
            if self.recorder is not None:
                self.recorder.attention(call.name, q[is_ref], k[is_ref], v[is_ref])
        else:  # every row is a target; its copy's (CFG half's) reference comes from the saved one
            saved = self.saved.attention(call.name)
            copy = torch.arange(batch, device=q.device) // self.images
            if batch % self.images or batch // self.images != saved["k"].shape[0]:
                raise ValueError(f"the saved reference has {saved['k'].shape[0]} CFG copies; this batch has {batch} "
                                 f"rows for {self.images} images (use the reference's guidance)")
            ref_k, ref_v = saved["k"][copy], saved["v"][copy]
            q_stats = saved["q_mean"][copy], saved["q_std"][copy]
        if o.adain_queries and q_stats is not None:
            q = torch.where(is_ref[:, None, None, None], q, adain_to(q, *q_stats))
        if o.adain_keys:
            k = torch.where(is_ref[:, None, None, None], k, adain(k, ref_k))
        if o.adain_values:
            v = torch.where(is_ref[:, None, None, None], v, adain(v, ref_v))
        if not o.share_attention:
            return q, k, v, None
        n = k.shape[-2]
        extra_k, extra_v = ref_k * o.shared_score_scale, ref_v
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
    """``with style_aligned(pipe, images=4): pipe(prompts)`` — the batch follows image 0's style.

    ``pipe`` may be a ControlNet pipeline (``controlnet_pipeline``): the reference's rows then get zero ControlNet
    residuals (as google/style-aligned's ControlNet demo), so it is what it would be without control; the
    image in its slot of the pipeline's control batch is ignored. With ``reference`` (a ``StyleReference`` from
    ``attnmod.methods.style_reference``) every image of the batch is a target: at each UNet call the saved
    reference's keys, values and statistics of that step are replayed, and the reference is not run at all.
    """

    def __init__(self, pipe, images: int, options: StyleAlignedOptions = StyleAlignedOptions(), *,
                 reference=None, recorder=None):
        require_unet(pipe, "StyleAligned")
        self.unet = getattr(pipe, "unet", pipe)
        self.controlnet = getattr(pipe, "controlnet", None) if reference is None else None
        self.options = options
        self.images = images
        self.reference = reference
        self.recorder = recorder
        if images < 1:
            raise ValueError(f"a style batch has at least one image, got {images}")
        if reference is None:
            reference_rows(images, images, options.reference)  # validates the index
        elif options.reference != 0:
            raise ValueError("with a saved reference every image of the batch is a target: options.reference "
                             "does not apply (leave it 0)")
        if (reference is not None or recorder is not None) and options.full_attention_share:
            raise ValueError("full_attention_share changes the reference with the batch: it cannot be saved or "
                             "replayed")
        self.layers = _shared_layers(self.unet, options)
        self.group_norms = [n for n, m in self.unet.named_modules() if isinstance(m, torch.nn.GroupNorm)]
        if reference is not None:
            reference.check_unet(self.unet, self.layers, self.group_norms if options.share_group_norm else [])
        self._attention = None
        self._handles = []
        self._source = None

    def _group_norm_hook(self, name, module, args, output):
        x = args[0]  # (B, C, ...)
        if self._source is not None:  # a saved reference: its statistics at this step
            mean, var = self._source.group_norm(name)
            return _group_norm_with_reference(x, module, mean, var, self.images)
        ref = reference_rows(x.shape[0], self.images, self.options.reference).to(x.device)
        if self.recorder is not None:  # recorded even where not shared now, for batches that share them
            is_ref = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            is_ref[ref] = True
            self.recorder.group_norm(name, module, x[is_ref])
        if not self.options.share_group_norm:
            return None
        joint = torch.cat([x, x[ref]], dim=-1)  # statistics over own and reference positions
        return F.group_norm(joint, module.num_groups, module.weight, module.bias, module.eps)[..., : x.shape[-1]]

    def _unet_call(self, module, args, kwargs):
        """Each UNet call is one step of the saved reference (checked by its timestep)."""
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        sample = args[0] if args else kwargs["sample"]
        if self._source is not None:
            self._source.begin_call(timestep, sample.device, sample.dtype)
        if self.recorder is not None:
            self.recorder.begin_call(timestep)

    def _zero_reference_residuals(self, module, args, output):
        """The ControlNet's residuals with the reference rows set to exactly zero."""
        tuple_out = isinstance(output, tuple)
        down, mid = output if tuple_out else (output.down_block_res_samples, output.mid_block_res_sample)
        rows = mid.shape[0]
        if rows % self.images:
            raise ValueError(f"the ControlNet batch has {rows} rows, not a multiple of the {self.images} images")
        keep = (torch.arange(rows, device=mid.device) % self.images != self.options.reference)[:, None, None, None]
        down = [torch.where(keep, d, torch.zeros((), dtype=d.dtype, device=d.device)) for d in down]
        mid = torch.where(keep, mid, torch.zeros((), dtype=mid.dtype, device=mid.device))
        if tuple_out:
            return (down, mid)
        return type(output)(down_block_res_samples=down, mid_block_res_sample=mid)

    def __enter__(self):
        try:
            if self.reference is not None:
                self._source = self.reference.player()
            hook = SharedAttention(self.options, self.images, self._source, self.recorder)
            self._attention = explicit_attention(self.unet, {}, {n: hook for n in self.layers},
                                                 query_chunk=self.options.query_chunk).__enter__()
            if self.options.share_group_norm or self.recorder is not None:
                modules = dict(self.unet.named_modules())
                for name in self.group_norms:
                    self._handles.append(modules[name].register_forward_hook(
                        lambda m, a, o, name=name: self._group_norm_hook(name, m, a, o)))
            if self._source is not None or self.recorder is not None:
                self._handles.append(self.unet.register_forward_pre_hook(self._unet_call, with_kwargs=True))
            if self.controlnet is not None:
                self._handles.append(self.controlnet.register_forward_hook(self._zero_reference_residuals))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._source = None
        if self._attention is not None:
            self._attention.__exit__(*exc)
            self._attention = None


def _group_norm_with_reference(x: torch.Tensor, module, ref_mean: torch.Tensor, ref_var: torch.Tensor,
                               images: int) -> torch.Tensor:
    """GroupNorm of ``x`` with statistics over its own and its copy's reference positions together, from the
    reference's per-group mean and (biased) variance (copies, groups): what ``F.group_norm`` of the two
    concatenated gives, to float rounding. Computed in float32."""
    b, g = x.shape[0], module.num_groups
    copy = torch.arange(b, device=x.device) // images
    xs = x.float().reshape(b, g, -1)
    var, mean = torch.var_mean(xs, dim=-1, unbiased=False)
    r_mean, r_var = ref_mean.to(x.device, torch.float32)[copy], ref_var.to(x.device, torch.float32)[copy]
    joint_mean = (mean + r_mean) / 2
    joint_var = (var + r_var) / 2 + ((mean - r_mean) / 2) ** 2
    y = (xs - joint_mean[..., None]).mul_((joint_var + module.eps).rsqrt()[..., None]).reshape(x.shape)
    if module.affine:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = torch.addcmul(module.bias.float().view(shape), y, module.weight.float().view(shape))
    return y.to(x.dtype)


def group_statistics(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-group mean and biased variance (B, groups) of a GroupNorm's input, in float32."""
    var, mean = torch.var_mean(x.float().reshape(x.shape[0], groups, -1), dim=-1, unbiased=False)
    return mean, var


# ---- ControlNet ---------------------------------------------------------------------------------------------


def controlnet_pipeline(pipe, controlnet):
    """The stock diffusers ControlNet pipeline (``StableDiffusionControlNetPipeline`` or, for SDXL,
    ``StableDiffusionXLControlNetPipeline``) sharing ``pipe``'s components, with ``controlnet`` added."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    unet = pipe.unet.config
    if (controlnet.config.cross_attention_dim, controlnet.config.in_channels) != (unet.cross_attention_dim,
                                                                                 unet.in_channels):
        raise ValueError(f"this ControlNet is for another model family (text width "
                         f"{controlnet.config.cross_attention_dim}, the model's is {unet.cross_attention_dim})")
    xl = getattr(pipe, "text_encoder_2", None) is not None
    cls = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
    with _quiet_diffusers():  # .to() and from_pipe warn about fp32 modules they never have to keep
        out = cls.from_pipe(pipe, controlnet=controlnet.to(pipe.unet.device, pipe.unet.dtype))
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return out


def load_controlnet(path: str, pipe):
    """A diffusers ControlNet folder, on the pipeline's device and dtype (a one-line error if it cannot be read)."""
    from pathlib import Path

    from diffusers import ControlNetModel

    from ..loading import _dtype_kwarg

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{path} is not a diffusers ControlNet folder (no config.json)")
    try:
        with _quiet_diffusers():
            controlnet = ControlNetModel.from_pretrained(path, **_dtype_kwarg(pipe.unet.dtype))
    except Exception as e:  # diffusers raises OSError, ValueError, safetensors errors, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the ControlNet {path}: {reason}") from None
    return controlnet.to(pipe.unet.device).eval()


def zero_controlnet(pipe):
    """A ControlNet made from the pipeline's own UNet encoder (diffusers' ``ControlNetModel.from_unet``). Its
    output convolutions start at zero, so it adds exactly nothing: a neutral ControlNet, for demos and checks
    (the conditioning encoder downsamples by the VAE's factor)."""
    from diffusers import ControlNetModel

    downs = int(math.log2(pipe.vae_scale_factor))
    channels = ((16, 32, 96, 256) + (256,) * 8)[: downs + 1]
    with _quiet_diffusers():
        controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels)
        return controlnet.to(pipe.unet.device, pipe.unet.dtype).eval()


@contextmanager
def _quiet_diffusers():
    """diffusers' warnings silenced for a moment (the library does not print); its level restored after."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def check_controls(controls, targets: int, width: int, height: int) -> list:
    """One PIL control image per target, each of the run's size (a one-line error otherwise)."""
    from PIL import Image

    controls = list(controls)
    if len(controls) != targets:
        raise ValueError(f"{len(controls)} control image(s) for {targets} target prompt(s): give one per target "
                         "(the reference gets no control)")
    for i, image in enumerate(controls, 1):
        if not isinstance(image, Image.Image):
            raise ValueError(f"control image {i} is a {type(image).__name__}, not a PIL image")
        if image.size != (width, height):
            raise ValueError(f"control image {i} is {image.width}x{image.height}; this run makes {width}x{height} "
                             f"images: resize it first (e.g. image.resize(({width}, {height})))")
    return controls


def generate_style_set(pipe, prompts: list[str], *, seed: int = 0, steps: int = 20, guidance: float = 7.5,
                       width: int | None = None, height: int | None = None,
                       options: StyleAlignedOptions = StyleAlignedOptions(), reference_image=None,
                       reference_prompt: str | None = None, saved_reference=None, controls=None,
                       control_scale: float = 1.0):
    """Images (N, H, W, 3) for ``prompts`` sharing one style; image ``i`` uses seed ``seed + i``.

    The reference is ``prompts[options.reference]``, or — with ``reference_image`` (a PIL image) and its
    describing ``reference_prompt`` — that image, DDIM-inverted and replayed in slot 0 (returned first), or
    ``saved_reference`` (a ``StyleReference``: computed once, replayed, not run again; returned first, every prompt
    a target, target ``j`` with seed ``seed + 1 + j`` as if the reference were image 0 of the set).

    ``controls``: with a ControlNet pipeline (``controlnet_pipeline``), one PIL control image per target, in
    order, of the run's size, at ``control_scale``; the reference gets no control.
    """
    import numpy as np

    from ..inversion.ddim import ddim_invert, replay_reference

    if not prompts and saved_reference is None:
        raise ValueError("a style set needs at least one prompt")
    if saved_reference is not None and reference_image is not None:
        raise ValueError("give a saved reference or a reference image, not both")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or side, height or side
    in_batch = saved_reference is None and reference_image is None  # the reference is one of the prompts
    extra = {}
    if controls is not None or getattr(pipe, "controlnet", None) is not None:
        if getattr(pipe, "controlnet", None) is None:
            raise ValueError("control images need a ControlNet pipeline (controlnet_pipeline(pipe, controlnet))")
        if controls is None:
            raise ValueError("a ControlNet pipeline needs control images, one per target")
        targets = check_controls(controls, len(prompts) - in_batch, width, height)
        if not targets and not (saved_reference is not None and not prompts):
            raise ValueError("a ControlNet style set needs at least one target prompt")
        if targets and not in_batch:
            extra["image"] = targets if saved_reference is not None else [targets[0], *targets]
        elif targets:  # the reference's slot holds any image: its residuals are zeroed
            extra["image"] = [*targets[: options.reference], targets[0], *targets[options.reference:]]
        extra["controlnet_conditioning_scale"] = control_scale
    if saved_reference is not None:
        saved_reference.check_run(pipe, width=width, height=height, steps=steps, guidance=guidance)
        if not prompts:
            return saved_reference.image[None].copy()
        generators = [torch.Generator().manual_seed(seed + 1 + j) for j in range(len(prompts))]
        with style_aligned(pipe, images=len(prompts), options=options, reference=saved_reference), \
                torch.inference_mode():
            out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                       generator=generators, output_type="np", **extra)
        return np.concatenate([saved_reference.image[None], np.asarray(out.images, dtype=np.float32)])
    if reference_image is not None:
        if not reference_prompt:
            raise ValueError("a reference image needs --ref-prompt describing it (used for its inversion)")
        trajectory = ddim_invert(pipe, reference_image, reference_prompt, steps=steps)
        prompts = [reference_prompt, *prompts]
        options = StyleAlignedOptions(**{**options.__dict__, "reference": 0})
        noise = [torch.randn(trajectory[-1].shape[1:], generator=torch.Generator().manual_seed(seed + i))
                 for i in range(1, len(prompts))]
        extra |= {"latents": torch.stack([trajectory[-1][0].cpu(), *noise]).to(pipe.unet.device, pipe.unet.dtype),
                  "callback_on_step_end": replay_reference(trajectory, 0)}
    else:
        extra["generator"] = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    with style_aligned(pipe, images=len(prompts), options=options), torch.inference_mode():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                   output_type="np", **extra)
    return np.asarray(out.images, dtype=np.float32)
