"""The one re-implementation of diffusers' attention with its parts exposed (q, k, v, probabilities).

AttnMod itself needs none of this (it scales ``to_out``'s input with a hook). Methods that must see or
change the attention's inside — attention maps, StyleAligned's shared keys and AdaIN, Prompt-to-Prompt —
install ``ExplicitAttnProcessor`` on the blocks they need, and only there: other blocks keep the fused
kernel. It mirrors ``AttnProcessor`` (spatial/group norm, cross norm, masks, q/k norms, residual,
rescale) step for step and is tested against the stock processor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionCall:
    """What an observer sees of one attention call."""

    name: str  # full block name
    is_cross: bool
    heads: int
    query_shape: tuple[int, ...]  # (B, Nq, C) of the hidden states, before heads split


ProbsHook = Callable[[AttentionCall, torch.Tensor], torch.Tensor | None]  # probs (B, h, Nq, Nk) -> new or None
WantsProbs = Callable[[AttentionCall], bool]  # False: this call runs the fused kernel, the probs hook is skipped
# (q, k, v) each (B, h, N, d) -> (q, k, v, logit bias broadcastable to (B, h, Nq, Nk) or None); k, v may grow
QKVHook = Callable[[AttentionCall, torch.Tensor, torch.Tensor, torch.Tensor], tuple]


def token_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """(h, w) of the patch grid a layer with ``tokens`` query tokens sees, for a latent of ``latent_hw``."""
    H, W = latent_hw
    f = (H * W / tokens) ** 0.5  # the layer's downsampling factor
    return round(H / f), round(W / f)


def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                    upcast: bool = False) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask). query: (B, h, Nq, d); key: (B, h, Nk, d) -> (B, h, Nq, Nk)."""
    dtype = query.dtype
    if upcast:
        query, key = query.float(), key.float()
    scores = (query @ key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return scores.float().softmax(dim=-1).to(dtype)


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, chunk: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v, ``chunk`` queries at a time (None: all at once, the fused kernel's call).

    Exact: each query's row of the softmax is independent of the others, so splitting the queries changes
    nothing but the size of what any kernel builds at once — (B, h, chunk, Nk) instead of (B, h, Nq, Nk) where
    PyTorch falls back to its math kernel (some masks on GPUs). query: (B, h, Nq, d); key, value: (B, h, Nk, d);
    mask broadcastable to (B, h, Nq, Nk) -> (B, h, Nq, d).
    """
    n = query.shape[-2]
    if chunk is None or chunk >= n:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    per_query = mask is not None and mask.shape[-2] != 1  # else the mask is the same for every query
    return torch.cat([F.scaled_dot_product_attention(query[..., i:i + chunk, :], key, value, scale=scale,
                                                     attn_mask=mask[..., i:i + chunk, :] if per_query else mask)
                      for i in range(0, n, chunk)], dim=-2)


class ExplicitAttnProcessor:
    """Attention with its parts exposed: ``qkv_hook`` may change q/k/v (and add a logit bias),
    ``probs_hook`` may observe or replace the probabilities. Without a probs hook the fused SDPA kernel
    computes the attention, so methods that only touch q/k/v (StyleAligned) stay fast; ``wants`` decides per
    call whether the probabilities are needed at all (e.g. maps only at some steps or resolutions), so the
    (B, h, Nq, Nk) tensor is only ever built where it is used. ``query_chunk`` evaluates the fused path that
    many queries at a time (``chunked_attention``: exact)."""

    def __init__(self, name: str, probs_hook: ProbsHook | None = None, qkv_hook: QKVHook | None = None,
                 wants: WantsProbs | None = None, query_chunk: int | None = None):
        self.name = name
        self.query_chunk = query_chunk
        self.probs_hook = probs_hook
        self.qkv_hook = qkv_hook
        self.wants = wants

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, _, _ = hidden_states.shape  # (B, Nq, C)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        call = AttentionCall(self.name, is_cross, attn.heads, tuple(hidden_states.shape))
        if self.qkv_hook is not None:
            query, key, value, bias = self.qkv_hook(call, query, key, value)
            if bias is not None:
                attention_mask = bias if attention_mask is None else attention_mask + bias
        if self.probs_hook is None or (self.wants is not None and not self.wants(call)):
            out = chunked_attention(query, key, value, attention_mask, attn.scale, self.query_chunk)
        else:
            probs = attention_probs(query, key, attn.scale, attention_mask, attn.upcast_attention)  # (B, h, Nq, Nk)
            replaced = self.probs_hook(call, probs)
            out = (probs if replaced is None else replaced) @ value
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)  # (B, Nq, C)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class explicit_attention:  # noqa: N801 - used like a function: ``with explicit_attention(unet, {...}):``
    """Install ``ExplicitAttnProcessor`` on some blocks; restore exactly the processors found on exit.

    ``hooks`` maps full block names to a probs hook (None: probabilities are not needed), ``qkv_hooks``
    full block names to a q/k/v hook; ``wants`` (optional) says per call whether the probs hook is needed;
    ``query_chunk`` (optional) bounds the queries evaluated at once on the fused path (exact).
    """

    def __init__(self, unet, hooks: dict[str, ProbsHook | None], qkv_hooks: dict[str, QKVHook] | None = None,
                 wants: WantsProbs | None = None, query_chunk: int | None = None):
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk is a number of queries >= 1 (or None: all at once), got {query_chunk}")
        self.query_chunk = query_chunk
        self.unet = getattr(unet, "unet", unet)
        self.hooks = hooks
        self.qkv_hooks = qkv_hooks or {}
        self.wants = wants
        self._saved = None

    def __enter__(self):
        self._saved = dict(self.unet.attn_processors)  # set_attn_processor empties what it is given
        processors = dict(self._saved)
        for name in {**self.hooks, **self.qkv_hooks}:
            key = name + ".processor"
            if key not in processors:
                raise ValueError(f"no attention block {name!r}")
            processors[key] = ExplicitAttnProcessor(name, self.hooks.get(name), self.qkv_hooks.get(name),
                                                    self.wants, self.query_chunk)
        self.unet.set_attn_processor(processors)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            self.unet.set_attn_processor(dict(self._saved))
            self._saved = None


# -- joint (MM-DiT) attention: queries and keys only ----------------------------------------------------------
def joint_query_key(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                    image_rotary_emb=None, text_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries and keys of an SD3 (``JointAttnProcessor2_0``) or FLUX (``FluxAttnProcessor``) attention
    call, as the stock processor forms them: per-stream projections, q/k norms, the streams joined ([image ‖
    text] on SD3, [text ‖ image] on FLUX: ``text_first``) and FLUX's rotary embedding.

    Word maps need nothing else: the stock processor still computes the attention (its output is never
    touched), and only the image queries' rows of the probabilities are ever formed (``dit.maps``). Tested
    against the stock path: softmax(q kᵀ·scale) v equals the processor's result before its projections.
    hidden_states: (B, Ni, C); encoder_hidden_states: (B, Nt, C') or None -> q, k: (B, h, N, d).
    """
    def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, h*d) -> (B, h, N, d)
        return t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    def normed(norm, t: torch.Tensor) -> torch.Tensor:  # the norms act on the head dim
        return t if norm is None else norm(t)

    query = normed(attn.norm_q, split(attn.to_q(hidden_states)))
    key = normed(attn.norm_k, split(attn.to_k(hidden_states)))
    if encoder_hidden_states is not None:
        added_q = normed(attn.norm_added_q, split(attn.add_q_proj(encoder_hidden_states)))
        added_k = normed(attn.norm_added_k, split(attn.add_k_proj(encoder_hidden_states)))
        pair = ((added_q, query), (added_k, key)) if text_first else ((query, added_q), (key, added_k))
        query, key = (torch.cat(p, dim=2) for p in pair)
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        query, key = (apply_rotary_emb(t.transpose(1, 2), image_rotary_emb, sequence_dim=1).transpose(1, 2)
                      for t in (query, key))
    return query, key
