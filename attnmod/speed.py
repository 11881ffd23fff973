"""Speed paths for real checkpoints: ``torch.compile`` of the UNet, CPU offload and VAE tiling.

``torch.compile`` does not see forward hooks added to submodules after it has traced them (dynamo does not
guard on module hooks by default), so AttnMod's usual hooks would be silently ignored by a compiled UNet.
``compile_unet`` therefore installs, *before* compiling, one permanent scale hook per attention block that
multiplies the attention result (before ``to_out``) by a per-block tensor held in ``ScaleSlots``: all ones
(bit-exact stock output) until an AttnMod binds to the slots (as their ``listener``: no hook is added) and writes
its multipliers into them **in place** each step. The compiled graph reads the same tensors every call, so neither a new step nor a new setting
(another scan batch) recompiles; only a new batch size does (once).
"""

from __future__ import annotations

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
DEFAULT_COMPILE_MODE = "default"
OFFLOAD = ("model", "sequential")
SLOTS_ATTR = "_attnmod_scale_slots"


class ScaleSlots:
    """Per-block (B, 1, 1) multiplier tensors that compiled scale hooks read; ones unless an AttnMod writes.

    ``unet`` is a UNet or an SD3 / FLUX transformer: there each block's stream is scaled by ``dit.scale_hooks``
    (its projection's input, or a single block's rows), reading the same slots."""

    def __init__(self, unet, names: list[str]):
        from . import dit

        self.names = list(names)
        self.dtype = unet.dtype
        self._by_batch: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}
        self.live: dict[str, torch.Tensor] = {}  # this call's tensors (the ones of its batch size)
        self._outer: list[dict[str, torch.Tensor]] = []  # of the calls around a nested one (a strategy's candidates)
        self.listener = None  # the bound AttnMod's step hook, called from the slots' own pre-hook (no new hook)
        self.text_tokens = 0  # a DiT call's text length (FLUX single blocks: the rows of the text)
        self._handles = [unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True),
                         unet.register_forward_hook(self._after_unet_call, always_call=True)]
        for name in self.names:
            if dit.is_dit(unet):
                self._handles += dit.scale_hooks(unet, name, self._getter(name), lambda: self.text_tokens)
            else:
                to_out = unet.get_submodule(name).to_out[0]
                self._handles.append(to_out.register_forward_pre_hook(self._scale_hook(name)))

    def tensors(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        """The persistent tensors for UNet batches of ``batch_size`` (created as ones)."""
        key = (batch_size, torch.device(device))
        if key not in self._by_batch:
            with torch.inference_mode(False):  # normal tensors: written in place inside and outside inference mode
                self._by_batch[key] = {n: torch.ones(batch_size, 1, 1, dtype=self.dtype, device=device)
                                       for n in self.names}
        return self._by_batch[key]

    def write(self, name: str, values: torch.Tensor, batch_size: int) -> None:
        """Write (images,) ``values`` into block ``name``'s tensor for ``batch_size`` (images × CFG copies)."""
        live = self.tensors(batch_size, values.device)[name]
        live.view(batch_size // values.numel(), values.numel()).copy_(values)

    def clear(self, names) -> None:
        """Back to ones (no change) for ``names``, every batch size."""
        for tensors in self._by_batch.values():
            for name in names:
                tensors[name].fill_(1.0)

    @torch.compiler.disable
    def _on_unet_call(self, module, args, kwargs):
        from .modify import denoiser_input

        sample = denoiser_input(args, kwargs)
        context = kwargs.get("encoder_hidden_states")
        self.text_tokens = context.shape[1] if context is not None else 0
        self._outer.append(self.live)
        self.live = self.tensors(sample.shape[0], sample.device)
        if self.listener is not None:
            self.listener(module, args, kwargs)

    @torch.compiler.disable
    def _after_unet_call(self, module, args, output):
        self.live = self._outer.pop() if self._outer else {}

    def _getter(self, name: str):
        return lambda: self.live[name]

    def _scale_hook(self, name: str):
        def hook(module, args):
            hidden = args[0]
            return (hidden * self.live[name].to(hidden.dtype), *args[1:])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def scale_slots(unet) -> ScaleSlots | None:
    """The ``ScaleSlots`` ``compile_unet`` installed on ``unet``, or None."""
    return getattr(unet, SLOTS_ATTR, None)


def is_compiled(module) -> bool:
    """A module compiled in place (``module.compile()``) or wrapped by ``torch.compile``."""
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")


def compile_unet(pipe, mode: str = DEFAULT_COMPILE_MODE, **compile_kwargs) -> None:
    """Compile the pipeline's denoiser in place (``unet.compile``; SD3 / FLUX: ``transformer.compile``) with
    AttnMod's scale slots installed first.

    ``mode`` is a ``torch.compile`` mode; ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend``).
    """
    from .blocks import list_blocks
    from .dit import denoiser

    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    unet = denoiser(pipe)
    if unet is pipe:
        raise ValueError("compile_unet needs a pipeline with a unet (SD1.5 / SDXL) or a transformer (SD3 / FLUX)")
    if is_compiled(unet):
        raise ValueError("the denoiser is already compiled; compile it once, with attnmod.speed.compile_unet")
    # dynamo then guards on module hooks: a method that adds hooks to submodules (StyleAligned's group norms)
    # recompiles instead of silently running a graph traced without them; AttnMod adds none (it is a listener)
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    setattr(unet, SLOTS_ATTR, ScaleSlots(unet, [b.name for b in list_blocks(unet)]))
    unet.compile(mode=None if mode == "default" else mode, **compile_kwargs)


def check_speed(device: str, compile: str | None = None, offload: str | None = None) -> None:
    """Refuse bad speed options before any work starts (one-line ``ValueError``)."""
    if compile is not None and compile not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
    if offload is None:
        return
    if offload not in OFFLOAD:
        raise ValueError(f"unknown offload {offload!r}; choose one of {', '.join(OFFLOAD)}")
    if torch.device(device).type != "cuda":
        raise ValueError(f"--offload {offload} needs a CUDA GPU (it keeps the weights in CPU memory and moves each "
                         f"part to the GPU while it runs); the device here is {device!r}")


def apply_speed(pipe, device, *, compile: str | None = None, offload: str | None = None,
                vae_tiling: bool = False):
    """Put ``pipe`` on ``device`` (or offload it to the CPU), tile its VAE, compile its UNet; returns ``pipe``.

    ``compile``: a ``torch.compile`` mode (``COMPILE_MODES``) or None; ``offload``: ``model``
    (``enable_model_cpu_offload``), ``sequential`` (``enable_sequential_cpu_offload``) or None;
    ``vae_tiling``: ``pipe.vae.enable_tiling()`` (decode/encode in overlapping tiles, blended).
    """
    check_speed(str(device), compile, offload)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    if compile is not None:
        compile_unet(pipe, mode=compile)
    return pipe
