"""Attention maps on DiT models (SD3 / SD3.5, FLUX): the image-query rows of the joint attention.

    with attnmod.dit.maps.trace(pipe) as tc:
        image = pipe(prompt).images[0]
    maps = tc.result(prompt)  # an ``AttentionMaps``: word_map, overlay, self_attention_pca, segmentation

An MM-DiT block attends over [image ‖ text] (SD3) or [text ‖ image] (FLUX) tokens. Per block call, a forward
hook recomputes the image queries and all keys (``attention.joint_query_key``; the stock processor's output
is untouched) and forms the probabilities one head at a time: the image × text part is the word map (summed
over heads, steps and blocks into (images, h, w, text tokens)), the image × image part the self-attention
(images, h·w, h·w). The (B, h, N, N) joint matrix is never built. Maps are at the token grid (h, w).

Text tokens: SD3's first text tokens are CLIP's (``pipe.tokenizer``), FLUX's are T5's (``pipe.tokenizer_2``).
With classifier-free guidance only the conditional half is kept; FLUX's true-CFG call and SD3's skip-layer
call (a second transformer call in the same step) are left out.
"""

from __future__ import annotations

import torch

from ..attention import attention_probs, joint_query_key
from ..blocks import resolve_blocks
from ..maps import AttentionMaps
from ..modify import denoiser_input
from ..steps import LoopClock
from . import denoiser, split_name


def t5_pieces(tokens: list[str]) -> list[str]:
    """T5 pieces in the CLIP spelling ``split_words`` reads: a word ends with ``</w>``; specials are ``<|..|>``.

    ["▁a", "▁re", "d", "</s>", "<pad>"] -> ["a</w>", "re", "d</w>", "<|/s|>", "<|pad|>"]
    """
    out: list[str] = []
    for i, piece in enumerate(tokens):
        if piece.startswith("<") and piece.endswith(">"):
            out.append(f"<|{piece.strip('<>')}|>")
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else "▁"
        ends = nxt.startswith("▁") or (nxt.startswith("<") and nxt.endswith(">"))
        out.append(piece.removeprefix("▁") + ("</w>" if ends else ""))
    return out


def image_rows(probs: torch.Tensor, text: slice, image: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's image-query probabilities (B, Ni, N) -> (B, Ni, Nt) to text keys, (B, Ni, Ni) to image keys."""
    return probs[..., text], probs[..., image]


class trace:  # noqa: N801 - a context manager used like ``maps.trace``
    """Capture word and self-attention maps of the next pipeline call(s) of an SD3 / FLUX pipeline."""

    def __init__(self, pipe, blocks: str = "all", steps: tuple[int, int] | None = None, self_attention: bool = True):
        self.pipe = pipe
        self.net = denoiser(pipe)
        self.steps = steps
        chosen = resolve_blocks(pipe, blocks)
        # a map needs the text keys: joint / single modules (SD3.5's image-only attn2 has none)
        self.modules = list(dict.fromkeys(split_name(b.name)[0] for b in chosen if ".attn2" not in b.name))
        if not self.modules:
            raise ValueError(f"blocks {blocks!r} hold no joint or single attention (attn2 sees no text)")
        self.self_attention = self_attention
        self.flux = hasattr(self.net, "single_transformer_blocks")
        self._clock = LoopClock(pipe, scheduler_steps=True)
        self._last_step = None
        self._grid: tuple[int, int] | None = None
        self._text = 0
        self._skip = False
        self.cross = None
        self.self_maps = None
        self._handles: list = []

    # -- state ------------------------------------------------------------------------------------------
    def _on_transformer(self, module, args, kwargs):
        self._clock.tick()
        step = self._clock.step
        # a second call in the same step (FLUX true CFG's negative, SD3 skip-layer guidance) is not kept
        self._skip = step == self._last_step or not (self.steps is None or self.steps[0] <= step < self.steps[1])
        self._last_step = step
        self._text = kwargs["encoder_hidden_states"].shape[1]
        sample = denoiser_input(args, kwargs)
        if self.flux:
            ids = kwargs["img_ids"]
            ids = ids[0] if ids.ndim == 3 else ids  # (Ni, 3): (0, row, col)
            self._grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        else:
            p = self.net.config.patch_size
            self._grid = (sample.shape[-2] // p, sample.shape[-1] // p)

    def _conditional(self, t: torch.Tensor) -> torch.Tensor:
        if getattr(self.pipe, "do_classifier_free_guidance", False) and not self.flux:
            return t[t.shape[0] // 2 :]
        return t

    def _on_attention(self, module, args, kwargs, output):
        if self._skip:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states")
        with torch.no_grad():
            q, k = joint_query_key(module, hidden, context, kwargs.get("image_rotary_emb"), text_first=self.flux)
            n_txt = self._text
            n_img = q.shape[2] - n_txt
            # key / query layout: SD3 [image ‖ text], FLUX [text ‖ image]
            text, image = (slice(0, n_txt), slice(n_txt, None)) if self.flux else (slice(n_img, None), slice(0, n_img))
            q_img = self._conditional(q[:, :, image])  # (b, h, Ni, d)
            k = self._conditional(k)
            cross = self_part = 0
            for head in range(q_img.shape[1]):  # one head at a time: (b, Ni, N), never (b, h, N, N)
                probs = attention_probs(q_img[:, head : head + 1], k[:, head : head + 1], q.shape[-1] ** -0.5)[:, 0]
                c, s = image_rows(probs.float(), text, image)
                cross = cross + c
                if self.self_attention:
                    self_part = self_part + s
        h, w = self._grid
        cross = cross.reshape(cross.shape[0], h, w, -1).cpu()  # (b, h, w, Nt)
        self.cross = cross if self.cross is None else self.cross + cross
        if self.self_attention:
            self_part = self_part.cpu()  # (b, Ni, Ni)
            self.self_maps = self_part if self.self_maps is None else self.self_maps + self_part
        return None

    # -- install / restore --------------------------------------------------------------------------------
    def __enter__(self) -> trace:
        try:
            self._handles.append(self.net.register_forward_pre_hook(self._on_transformer, with_kwargs=True))
            for name in self.modules:
                self._handles.append(
                    self.net.get_submodule(name).register_forward_hook(self._on_attention, with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def result(self, prompts: list[str] | str | None = None) -> AttentionMaps:
        """The aggregated maps over the prompt tokenizer's text columns (SD3: CLIP's; FLUX: T5's)."""
        if self.cross is None:
            raise ValueError("nothing was captured: run the pipeline inside the trace (and check the step range)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        tok = self.pipe.tokenizer_2 if self.flux else self.pipe.tokenizer
        length = self.cross.shape[-1] if self.flux else tok.model_max_length
        tokens = []
        for p in prompts:
            ids = tok(p, padding="max_length", truncation=True, max_length=length).input_ids
            pieces = tok.convert_ids_to_tokens(ids)
            tokens.append(t5_pieces(pieces) if self.flux else pieces)
        cross = self.cross[..., :length]
        return AttentionMaps(cross, self.self_maps if self.self_attention else None,
                             self._grid if self.self_attention else None, tokens)
