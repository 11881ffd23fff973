"""Composition of the prompt embedding from several text encoders (SDXL has two; paper Sec. 3.6).

SDXL concatenates the penultimate hidden states of its two CLIP encoders along channels and takes the
pooled embedding from the second. ``compose_encoders`` weights each encoder's part by scaling that
encoder's outputs (all hidden states and its pooled/projected embedding) with a forward hook, so the
pooled embedding always follows the weight of the encoder it comes from. Weights are per image, so a
scan over compositions runs in one batch. Negative prompts pass through the same encoders and are
weighted alike; an all-zero negative (SDXL's ``force_zeros_for_empty_prompt``) stays zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Weights = tuple[float, ...]  # one weight per text encoder, in pipeline order


def text_encoders(pipe) -> list:
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


def scale_encoder_output(output, weight: torch.Tensor):
    """Scale every embedding an encoder returns. weight: (N,) per prompt of the encoder's batch."""
    for key in ("last_hidden_state", "pooler_output", "text_embeds"):
        value = output.get(key) if hasattr(output, "get") else None
        if value is not None:
            output[key] = value * weight.view(-1, *([1] * (value.ndim - 1))).to(value.dtype)
    if getattr(output, "hidden_states", None) is not None:
        output["hidden_states"] = tuple(h * weight.view(-1, 1, 1).to(h.dtype) for h in output.hidden_states)
    return output


class ComposeEncoders:
    """Context manager: weight each text encoder's contribution, per image; restores on exit."""

    def __init__(self, pipe, weights: Weights | Sequence[Weights]):
        self.encoders = text_encoders(pipe)
        per_image = [weights] if weights and isinstance(weights[0], int | float) else list(weights)
        for w in per_image:
            if len(w) != len(self.encoders):
                raise ValueError(f"encoder weights {tuple(w)} need one value per text encoder ({len(self.encoders)})")
        self.table = torch.tensor(per_image, dtype=torch.float32)  # (images, encoders)
        self._handles = []

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            column = self.table[:, index]
            batch = (args[0] if args else kwargs["input_ids"]).shape[0]
            if batch % len(column):
                raise ValueError(f"text encoder batch {batch} is not a multiple of {len(column)} weight settings")
            return scale_encoder_output(output, column.repeat(batch // len(column)).to(output[0].device))
        return hook

    def __enter__(self):
        for i, encoder in enumerate(self.encoders):
            if not bool((self.table[:, i] == 1).all()):
                self._handles.append(encoder.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


def compose_encoders(pipe, weights: Weights | Sequence[Weights]) -> ComposeEncoders:
    """``with compose_encoders(sdxl, (0.5, 1.0)): sdxl(prompt)`` — half the first encoder's part."""
    return ComposeEncoders(pipe, weights)
