"""Bounded Attention (Dahary et al., ECCV 2024) and layout guidance (Chen et al., WACV 2024): subjects in boxes.

    r = bounded(pipe, "a red circle, a blue square", [Subject("red circle", (0.05, 0.3, 0.45, 0.7)),
                                                      Subject("blue square", (0.55, 0.3, 0.95, 0.7))])
    r.images, r.masks, r.losses

Text-to-image models neglect subjects, fuse them and bind attributes to the wrong one because cross- and
self-attention leak between subjects. Bounded attention masks the leaks in every attention layer at every
step: in cross-attention (conditional half) a subject's pixels see its own tokens and no other subject's,
background pixels see no subject token and not the first EOS; in self-attention (both halves) a subject's
pixels see their own subject and the background. Masks are the boxes until step 15, then every 5 steps the
self-attention maps of the mask layers (averaged over the run so far) are clustered (3 clusters per subject)
and each cluster goes to the subject whose cross-attention covers it most. During the first 15 steps *bounded
guidance* moves the latents (up to 5 gradient steps, step size falling linearly) down the loss
1.5 · Σ_s (1 − iou_s)² over the cross layers + 0.5 · Σ_s (1 − iou_s)² over the self layers,
iou_s = fg_s / (fg_s + S · bg_s), stopping below 0.2 (per image and subject). ``layout_guidance`` is the
baseline the slides show first: the same loop with the cross-attention term only and no masks.

The defaults follow omer11a/bounded-attention, each rule pinned by a test: its layers (SD1.5: the mid block and
``up_blocks.1`` for the loss, ``up_blocks.1`` for the masks; SDXL: ``up_blocks.0.attentions.0`` transformer
blocks 1–6), picked here by resolution (``reference_layers``) so other models work; boxes rasterised with
Python's ``round``; step size ``start + (end − start) · i / 15`` (8 → 2 on SD1.x, 18 → 5 on SDXL); the
running mean of the maps, the sigmoid(10 · (m − 0.2)) of the cross maps and the 0.2 cluster score; an empty
refined mask falls back to its box; overlapping boxes: a pixel in two boxes belongs to both subjects (it sees
both subjects' tokens and pixels). Departures, each for a stated reason: words are matched with attnmod's
own token spans and a fixed list of function words (the reference tags words with nltk: ``FUNCTION_WORDS``
holds the tags it filters), the leading token of a subject is its last word (the reference's last noun:
the same for adjective–noun phrases), the k-means is attnmod's (k-means++ seeded, not warm-started), the
guidance passes run the conditional half only (the loss reads nothing else), and the masks are additive
biases of the fused attention kernel except on the loss and mask layers, the only ones whose probabilities
are read (the reference builds every layer's probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..attention import AttentionCall, explicit_attention, token_grid
from ..blocks import downsampling, list_blocks, resolve_blocks
from ..dit import require_unet
from ..generate import finite
from ..inversion.ddim import unet_conditioning
from ..segment import kmeans
from ..steps import LoopClock
from ..tokenizer import split_words

# Words the reference hides from every pixel (its nltk tags CC, CD, DT, EX, IN, LS, MD, PDT, POS, PRP, PRP$,
# RP, TO, UH, WDT, WP, WRB, and left/right/top/bottom, which it tags IN); numbers too (CD).
FUNCTION_WORDS = frozenset(["a", "an", "the", "this", "that", "these", "those", "each", "every", "some", "any", "no", "all", "both", "half", "either", "neither", "another", "such", "and", "or", "but", "nor", "plus", "yet", "so", "in", "on", "at", "of", "with", "by", "for", "from", "to", "into", "onto", "under", "over", "above", "below", "behind", "beside", "besides", "between", "near", "inside", "outside", "through", "across", "against", "along", "around", "among", "beneath", "beyond", "during", "upon", "within", "without", "toward", "towards", "via", "as", "than", "like", "off", "up", "down", "out", "about", "after", "before", "since", "until", "per", "there", "it", "its", "he", "she", "they", "them", "his", "her", "their", "we", "our", "you", "your", "i", "my", "me", "him", "us", "one's", "'s", "which", "who", "whom", "whose", "what", "where", "when", "how", "why", "whether", "if", "can", "could", "will", "would", "shall", "should", "may", "might", "must", "left", "right", "top", "bottom", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"])


@dataclass(frozen=True)
class Subject:
    """A subject: its words as they appear in the prompt and its box (x0, y0, x1, y1) in [0, 1], top-left origin."""

    words: str
    box: tuple[float, float, float, float]

    def __post_init__(self):
        if not self.words.strip():
            raise ValueError("a subject needs words from the prompt")
        box = tuple(float(v) for v in self.box)
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ValueError(f"the box of {self.words!r} must be four finite numbers x0,y0,x1,y1, got {self.box}")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"the box of {self.words!r} must have 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                             f"(normalised, top-left origin), got {','.join(f'{v:g}' for v in box)}")
        object.__setattr__(self, "box", box)


@dataclass(frozen=True)
class BoundedOptions:
    masks: bool = True  # bounded masks in every layer; False: layout guidance's plain attention
    guidance_steps: int = 15  # steps 0..14 get bounded guidance
    iterations: int = 5  # gradient steps per guided step, at most
    start_step_size: float | None = None  # None: 8 on SD1.x, 18 on SDXL (the reference's runs)
    end_step_size: float | None = None  # None: 2 on SD1.x, 5 on SDXL
    cross_loss: float = 1.5
    self_loss: float = 0.5
    stop_loss: float = 0.2  # the loss per image and subject below which a step's guidance stops
    refine_from: int = 15  # first step whose masks come from the clustered self-attention
    refine_every: int = 5
    clusters_per_subject: int = 3
    cross_threshold: float = 0.2  # the cross maps' sigmoid centre
    cluster_threshold: float = 0.2  # a cluster below this cross-attention score is background
    mask_eos: bool = True  # background pixels do not see the first EOS token
    loss_blocks: str | None = None  # block selector; None: ``reference_layers``
    mask_blocks: str | None = None
    seed: int = 0  # of the k-means seeding
    explicit_everywhere: bool = False  # build every layer's probabilities, as the reference does (for measuring)

    def __post_init__(self):
        for name in ("guidance_steps", "iterations", "refine_every", "clusters_per_subject"):
            if getattr(self, name) < (1 if name in ("refine_every", "clusters_per_subject") else 0):
                raise ValueError(f"{name} must be >= {1 if name in ('refine_every', 'clusters_per_subject') else 0}"
                                 f", got {getattr(self, name)}")
        for name in ("cross_loss", "self_loss", "stop_loss", "start_step_size", "end_step_size"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")


LAYOUT_GUIDANCE = BoundedOptions(masks=False, self_loss=0.0)  # Chen et al.'s backward guidance


@dataclass
class LayoutResult:
    images: np.ndarray  # (B, H, W, 3) in [0, 1]
    masks: torch.Tensor  # (B, S, h, w) bool: the last masks (the refined ones, else the boxes) at the mask layers' grid
    losses: list[tuple[int, int, float]] = field(default_factory=list)  # (step, iteration, loss per image and subject)
    tokens: list[list[int]] = field(default_factory=list)  # each subject's token positions
    refined: list[int] = field(default_factory=list)  # the steps whose masks came from a new clustering


# ---------------------------------------------------------------- words and tokens

def _words(tokenizer, text: str) -> list[tuple[str, list[int]]]:
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return split_words(tokenizer.convert_ids_to_tokens(ids))


def subject_tokens(tokenizer, prompt: str, subjects: Sequence[Subject]) -> list[list[int]]:
    """Each subject's token positions: the first occurrence of its words, as a phrase, that no earlier subject
    took ("a red square, a blue square": "blue square" -> the second square). ValueError lists the prompt's words."""
    words = _words(tokenizer, prompt)
    taken: set[int] = set()
    out = []
    for s in subjects:
        phrase = [w for w, _ in _words(tokenizer, s.words)]
        n = len(phrase)
        for i in range(len(words) - n + 1):
            if [w for w, _ in words[i : i + n]] == phrase and not taken & {i + j for j in range(n)}:
                taken |= {i + j for j in range(n)}
                out.append([p for _, positions in words[i : i + n] for p in positions])
                break
        else:
            raise ValueError(f"subject {s.words!r} is not in the prompt (as consecutive words, once per subject); "
                             f"the prompt's words: {' '.join(w for w, _ in words)}")
    return out


def filtered_tokens(tokenizer, prompt: str) -> list[int]:
    """Positions of function words and numbers (``FUNCTION_WORDS``): hidden from every pixel."""
    return [p for w, positions in _words(tokenizer, prompt) if w in FUNCTION_WORDS or w.isdigit() for p in positions]


def eos_position(tokenizer, prompt: str) -> int:
    """Position of the first end-of-text token."""
    return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids) - 1


# ---------------------------------------------------------------- layers

def reference_layers(unet) -> tuple[list[str], list[str]]:
    """(loss blocks, mask blocks), attn1 and attn2 of each: the decoder's coarsest attention resolution — all of
    it where each attention holds one transformer block (SD1.x: ``up_blocks.1``), else the first attention's
    transformer blocks 1–6 (SDXL: ``up_blocks.0.attentions.0``); the loss adds the mid block where it is coarser
    still (SD1.x). The reference's layer indices 12–19 / 14–19 (SD1.5) and 70–81 (SDXL)."""
    factors = downsampling(unet)
    up = [b.name for b in list_blocks(unet) if b.name.startswith("up_blocks.")]
    if not up:
        raise ValueError("this model has no decoder attention blocks; choose loss_blocks and mask_blocks")
    coarse = max(factors[n] for n in up)
    level = [n for n in up if factors[n] == coarse]
    first = min(level, key=lambda n: [int(p) for p in n.split(".") if p.isdigit()])
    attention = first.split(".transformer_blocks.")[0]
    depth = len({n.split(".transformer_blocks.")[1].split(".")[0] for n in level if n.startswith(attention + ".")})
    if depth > 1:
        mask = [n for n in level if n.startswith(attention + ".")
                and 1 <= int(n.split(".transformer_blocks.")[1].split(".")[0]) <= 6]
        return mask, mask
    mid = [n for n in factors if n.startswith("mid_block") and factors[n] > coarse]
    return [n for n in factors if n in mid or n in level], level


def step_sizes(pipe, options: BoundedOptions) -> tuple[float, float]:
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    start = options.start_step_size if options.start_step_size is not None else (18.0 if sdxl else 8.0)
    end = options.end_step_size if options.end_step_size is not None else (5.0 if sdxl else 2.0)
    return start, end


def guidance_step_size(start: float, end: float, step: int, guidance_steps: int) -> float:
    """The reference's schedule: linear from ``start`` at step 0 towards ``end`` at step ``guidance_steps``."""
    return start + (end - start) * step / guidance_steps


# ---------------------------------------------------------------- masks

def box_masks(boxes: Sequence[tuple[float, float, float, float]], h: int, w: int, device=None) -> torch.Tensor:
    """(S, h·w) bool: rows round(y0·h)..round(y1·h), columns round(x0·w)..round(x1·w) (Python's round)."""
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool, device=device)
    for s, (x0, y0, x1, y1) in enumerate(boxes):
        masks[s, round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = True
    return masks.flatten(1)


def cross_bias(masks: torch.Tensor, tokens: list[list[int]], hidden: list[int], eos: int, length: int,
               background_sees_subjects: bool = False, mask_eos: bool = True, dtype=torch.float32) -> torch.Tensor:
    """masks: (B, S, N) bool -> (B, N, K) logit bias (0 or the dtype's minimum) of the conditional half.

    Subject tokens and ``hidden`` (function words) are hidden from every pixel, then each subject's tokens
    shown to its own pixels (and to the background during guidance); background pixels lose the first EOS."""
    B, S, N = masks.shape
    background = ~masks.any(1)  # (B, N)
    if background_sees_subjects:
        masks = masks | background[:, None]
    allowed = torch.ones(B, N, length, dtype=torch.bool, device=masks.device)
    allowed[:, :, sorted({*hidden, *(t for ts in tokens for t in ts)})] = False
    for s, ts in enumerate(tokens):
        allowed[:, :, ts] |= masks[:, s, :, None]
    if mask_eos and not background_sees_subjects:
        allowed[:, :, eos] &= ~background
    return torch.zeros(allowed.shape, dtype=dtype, device=masks.device).masked_fill(~allowed, torch.finfo(dtype).min)


def self_bias(masks: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """masks: (B, S, N) bool -> (B, N, N) logit bias: a pixel of a subject does not see pixels of subjects it is not
    part of; background pixels see everything and are seen by everyone."""
    subject = masks.any(1)  # (B, N)
    shared = (masks.transpose(1, 2).float() @ masks.float()) > 0  # (B, N, N): i and j in one subject
    blocked = subject[:, :, None] & subject[:, None, :] & ~shared
    return torch.zeros(blocked.shape, dtype=dtype, device=masks.device).masked_fill(blocked, torch.finfo(dtype).min)


def resize_masks(masks: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """(B, S, h·w) bool on ``grid`` -> (B, S, H·W) on ``to`` (nearest-exact, as the reference)."""
    if grid == to:
        return masks
    B, S, _ = masks.shape
    out = F.interpolate(masks.float().view(B, S, *grid), size=to, mode="nearest-exact")
    return out.flatten(2) > 0.5


def normalize_maps(maps: torch.Tensor, reduce_min: bool = False) -> torch.Tensor:
    """(B, N, K) -> each column over N divided by its maximum (after subtracting its minimum), + 1e-5."""
    low = maps.min(1, keepdim=True).values if reduce_min else 0
    return (maps - low) / (maps.max(1, keepdim=True).values - low + 1e-5)


def refine_masks(self_map: torch.Tensor, cross_map: torch.Tensor, current: torch.Tensor, boxes: torch.Tensor,
                 clusters: int, cross_threshold: float = 0.2, cluster_threshold: float = 0.2,
                 seed: int = 0) -> torch.Tensor:
    """Masks from the clustered self-attention (the reference's rule).

    self_map: (B, N, N) mean self-attention; cross_map: (B, N, S) mean cross-attention of each subject's leading
    token; current: (B, S, N) bool masks now; boxes: (S, N) bool -> (B, S, N) bool."""
    B, S, N = current.shape
    features = normalize_maps(self_map.float())  # rows: a pixel's attention over the image
    labels = torch.stack([kmeans(features[b], clusters, seed=seed) for b in range(B)])  # (B, N)
    cross = torch.sigmoid(10 * (normalize_maps(cross_map.float()) - cross_threshold))
    cross = normalize_maps(cross, reduce_min=True).transpose(1, 2) * current.float()  # (B, S, N)
    member = F.one_hot(labels, clusters).float()  # (B, N, C)
    overlap = cross @ member  # (B, S, C)
    smaller = torch.minimum(cross.sum(2, keepdim=True), member.sum(1, keepdim=True))  # (B, S, C)
    score, owner = (overlap / smaller).max(1)  # (B, C)
    pixel_owner, pixel_score = owner.gather(1, labels), score.gather(1, labels)  # (B, N)
    masks = F.one_hot(pixel_owner, S).transpose(1, 2).bool() & (pixel_score >= cluster_threshold)[:, None]
    for b in range(B):  # an empty mask falls back to its box, taken from the others
        for s in range(S):
            if not masks[b, s].any():
                masks[b] &= ~boxes[s]
                masks[b, s] = boxes[s]
    return masks


# ---------------------------------------------------------------- loss

def foreground_background(probs: torch.Tensor, boxes: torch.Tensor, context: torch.Tensor) -> tuple:
    """probs: (B, h, N, K); boxes: (S, N) bool; context: (K, S) 0/1 — which keys count for each subject.
    -> (fg, bg), each (B, S): attention mass on a subject's context from inside its box / from the background."""
    mass = probs.float().sum(1) @ context  # (B, N, S)
    background = (~boxes.any(0)).float()  # (N,)
    return (mass * boxes.T.float()).sum(1), (mass * background[:, None]).sum(1)


def iou_loss(fg: list[torch.Tensor], bg: list[torch.Tensor]) -> torch.Tensor:
    """(1 − iou)² per (image, subject), iou = fg / (fg + S · bg) of the layers' mean values."""
    fg_mean, bg_mean = torch.stack(fg).mean(0), torch.stack(bg).mean(0)  # (B, S)
    return (1 - fg_mean / (fg_mean + fg_mean.shape[1] * bg_mean)) ** 2


# ---------------------------------------------------------------- the intervention

class BoundedAttention:
    """The bounded masks (q/k/v hook: a logit bias), the maps and loss values (probs hook on the loss and mask
    layers) and bounded guidance (``guide``, ``on_step_end``), at the loop's step. A context manager: the stock
    processors are back on exit."""

    def __init__(self, pipe, prompt: str, subjects: Sequence[Subject], options: BoundedOptions = BoundedOptions(),
                 images: int = 1):
        self.pipe, self.o, self.images = pipe, options, images
        self.subjects = list(subjects)
        tok = pipe.tokenizer
        self.tokens = subject_tokens(tok, prompt, self.subjects)
        self.hidden = filtered_tokens(tok, prompt)
        self.eos = eos_position(tok, prompt)
        self.leading = [ts[-1] for ts in self.tokens]
        unet = pipe.unet
        loss, mask = reference_layers(unet)
        if options.loss_blocks is not None:
            loss = [b.name for b in resolve_blocks(unet, options.loss_blocks)]
        if options.mask_blocks is not None:
            mask = [b.name for b in resolve_blocks(unet, options.mask_blocks)]
        self.loss_layers = set(loss) if options.cross_loss or options.self_loss else set()
        self.mask_layers = set(mask) if options.masks else set()
        factors = downsampling(unet)
        if self.mask_layers and len({factors.get(n) for n in self.mask_layers}) > 1:
            raise ValueError("the mask blocks must share one resolution (their maps are averaged)")
        self.mask_factor = factors.get(next(iter(self.mask_layers)), 1) if self.mask_layers else None
        self._check_boxes(factors)
        self.clock = LoopClock(pipe)
        self.losses: list[tuple[int, int, float]] = []
        self.refined: list[int] = []
        self._guiding = False
        self._reset()

    def _check_boxes(self, factors: dict[str, int]) -> None:
        """Every box must cover a cell of the mask layers' grid and of the loss layers' finest grid (a layer where it
        covers none adds nothing to its loss, as in the reference), and the clusters must fit the mask grid."""
        side = self.pipe.unet.config.sample_size
        boxes = [s.box for s in self.subjects]
        grids = {side // self.mask_factor} if self.mask_factor is not None else set()
        if self.loss_layers:
            grids.add(side // min(factors.get(n, 1) for n in self.loss_layers))
        for grid in sorted(grids):
            for s, cells in zip(self.subjects, box_masks(boxes, grid, grid).sum(1).tolist(), strict=True):
                if cells == 0:
                    raise ValueError(f"the box of {s.words!r} covers no cell of the {grid}x{grid} attention grid the "
                                     f"method reads; make it wider and taller than 1/{grid} of the image (or read "
                                     "finer layers: loss_blocks, mask_blocks)")
        if self.mask_factor is not None:
            cells = (side // self.mask_factor) ** 2
            if len(self.subjects) * self.o.clusters_per_subject > cells:
                raise ValueError(f"{len(self.subjects)} subjects x {self.o.clusters_per_subject} clusters need more "
                                 f"than the {cells} cells of this model's mask layers: at most "
                                 f"{cells // self.o.clusters_per_subject} subjects")

    def _reset(self) -> None:
        self.cross_mean = self.self_mean = None
        self.maps_seen = [0, 0]
        self.masks = None  # (B, S, N) refined, on the mask grid
        self.mask_grid = None
        self.latent_hw = None
        self._values: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
        self._bias_cache: dict = {}

    # -- the step
    def on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.latent_hw = tuple(sample.shape[-2:])
        if self._guiding:
            return
        if self.clock.tick():
            self._reset()
            self.latent_hw = tuple(sample.shape[-2:])
        step, o = self.clock.step, self.o
        if (self.mask_layers and step >= o.refine_from and self.self_mean is not None
                and (self.masks is None or step % o.refine_every == 0)):
            self._refine()
            self.refined.append(step)

    def _refine(self) -> None:
        grid = self.mask_grid
        boxes = box_masks([s.box for s in self.subjects], *grid, device=self.self_mean.device)
        current = self.masks if self.masks is not None else boxes.expand(self.self_mean.shape[0], -1, -1)
        self.masks = refine_masks(self.self_mean, self.cross_mean, current, boxes,
                                  len(self.subjects) * self.o.clusters_per_subject, self.o.cross_threshold,
                                  self.o.cluster_threshold, self.o.seed)
        self._bias_cache.clear()

    def layer_masks(self, grid: tuple[int, int], batch: int, device) -> torch.Tensor:
        """(batch, S, h·w) bool: the refined masks resized to ``grid``, else the boxes."""
        if self.masks is not None:
            return resize_masks(self.masks, self.mask_grid, grid).to(device)
        return box_masks([s.box for s in self.subjects], *grid, device=device).expand(batch, -1, -1)

    # -- attention hooks
    def wants(self, call: AttentionCall) -> bool:
        if self.o.explicit_everywhere:
            return True
        return call.name in (self.loss_layers if self._guiding else self.mask_layers)

    def qkv(self, call: AttentionCall, q, k, v):
        if not self.o.masks:
            return q, k, v, None
        rows, nq, nk = q.shape[0], q.shape[2], k.shape[2]
        key = (call.is_cross, nq, nk, rows, self._guiding, q.dtype)
        bias = self._bias_cache.get(key)
        if bias is None:
            grid = token_grid(self.latent_hw, nq)
            halves = max(1, rows // self.images)
            masks = self.layer_masks(grid, self.images, q.device)
            if call.is_cross:
                cond = cross_bias(masks, self.tokens, self.hidden, self.eos, nk, self._guiding, self.o.mask_eos,
                                  q.dtype)
                bias = torch.cat([torch.zeros_like(cond)] * (halves - 1) + [cond])
            else:  # one image: one (1, N, N) bias broadcasts over both halves
                bias = self_bias(masks, q.dtype)
                bias = bias if self.images == 1 else bias.repeat(halves, 1, 1)
            bias = bias[:, None]  # (rows, 1, Nq, Nk)
            self._bias_cache[key] = bias
        return q, k, v, bias

    def probs(self, call: AttentionCall, probs: torch.Tensor) -> None:
        if call.name not in (self.loss_layers if self._guiding else self.mask_layers):
            return None  # explicit_everywhere: built, not read
        cond = probs[-self.images :]  # (B, h, N, K): the conditional half (guidance runs it alone)
        grid = token_grid(self.latent_hw, probs.shape[2])
        if self._guiding:
            boxes = box_masks([s.box for s in self.subjects], *grid, device=probs.device)
            if call.is_cross:
                context = torch.zeros(probs.shape[-1], len(self.subjects), device=probs.device)
                for s, ts in enumerate(self.tokens):
                    context[[*ts, self.eos], s] = 1  # the reference counts the EOS with each subject's tokens
            else:
                context = boxes.T.float()
            fg, bg = foreground_background(cond, boxes, context)
            self._values[call.is_cross][0].append(fg)
            self._values[call.is_cross][1].append(bg)
            return None
        with torch.no_grad():  # the running mean over the run's steps and the mask layers, as the reference
            m = cond[..., self.leading].float().mean(1) if call.is_cross else cond.float().mean(1)  # (B, N, S|N)
            kind = 0 if call.is_cross else 1
            self.maps_seen[kind] += 1
            n = self.maps_seen[kind]
            old = (self.cross_mean, self.self_mean)[kind]
            new = m if old is None else old * ((n - 1) / n) + m / n
            self.cross_mean, self.self_mean = (new, self.self_mean) if call.is_cross else (self.cross_mean, new)
            self.mask_grid = grid
        return None

    # -- guidance
    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, loss per image and subject) of the values the last guidance pass recorded."""
        total = 0
        for is_cross, weight in ((True, self.o.cross_loss), (False, self.o.self_loss)):
            fg, bg = self._values[is_cross]
            if weight and fg:
                total = total + weight * iou_loss(fg, bg).sum()
        if not torch.is_tensor(total):
            raise ValueError("no loss layer recorded attention (check loss_blocks)")
        return total, total / (self.images * len(self.subjects))

    def guide(self, latents: torch.Tensor, step: int, timestep, conditioning: tuple) -> torch.Tensor:
        """Bounded guidance of one step: up to ``iterations`` gradient steps on the latents (B, C, h, w)."""
        o = self.o
        if step >= o.guidance_steps or not self.loss_layers:
            return latents
        size = guidance_step_size(*step_sizes(self.pipe, o), step, o.guidance_steps)
        context, extra = conditioning
        x, last = latents.detach().clone(), math.inf
        with torch.enable_grad():
            for it in range(o.iterations):
                if last < o.stop_loss:
                    break
                x.requires_grad_(True)
                self._values = {True: ([], []), False: ([], [])}
                self._guiding = True
                try:
                    model_in = self.pipe.scheduler.scale_model_input(x, timestep)
                    self.pipe.unet(model_in, timestep, encoder_hidden_states=context, **extra)
                finally:
                    self._guiding = False
                loss, per = self.loss()
                grad = torch.autograd.grad(loss, [x])[0]
                x = (x - size * grad).detach()
                last = float(per.detach())
                self.losses.append((step, it, last))
        return x

    def __enter__(self):
        unet = self.pipe.unet
        every = [b.name for b in list_blocks(unet)]
        probs = dict.fromkeys(every if self.o.explicit_everywhere else self.loss_layers | self.mask_layers, self.probs)
        qkv = dict.fromkeys(every, self.qkv) if self.o.masks else {}
        self._attention = explicit_attention(unet, probs, qkv, wants=self.wants)
        self._handle = unet.register_forward_pre_hook(self.on_unet, with_kwargs=True)
        try:
            self._attention.__enter__()
        except BaseException:
            self._handle.remove()
            raise
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._attention.__exit__(*exc)


def _conditioning(pipe, prompt: str, images: int, size: tuple[int, int]) -> tuple:
    """The conditional half of the pipeline's UNet inputs, for the guidance passes."""
    context, extra = unet_conditioning(pipe, prompt, False, size=size)
    context = context.repeat(images, 1, 1)
    extra = {k: {n: t.repeat(images, 1) for n, t in v.items()} for k, v in extra.items()}
    return context, extra


def bounded(pipe, prompt: str, subjects: Sequence[Subject], options: BoundedOptions = BoundedOptions(), *,
            steps: int = 50, guidance: float = 7.5, seed: int = 0, images: int = 1, height: int | None = None,
            width: int | None = None, negative_prompt: str | None = None,
            callback: Callable[[int, int, float], None] | None = None) -> LayoutResult:
    """Images of ``prompt`` with each subject inside its box. No subjects: the stock pipeline, untouched.

    ``callback(step, iteration, loss)`` after each guidance step (progress; the library never prints)."""
    require_unet(pipe, "Bounded Attention / layout guidance")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or side, width or side
    generator = torch.Generator(device="cpu").manual_seed(seed)
    call = dict(num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=images, height=height,
                width=width, negative_prompt=negative_prompt, output_type="np")
    if not subjects:
        out = pipe(prompt, generator=generator, **call).images
        return LayoutResult(np.asarray(out, dtype=np.float32), torch.zeros(images, 0, 0, 0, dtype=torch.bool))
    with BoundedAttention(pipe, prompt, subjects, options, images=images) as ba:
        device, dtype = pipe.unet.device, pipe.unet.dtype
        shape = (images, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        sigma = pipe.scheduler.init_noise_sigma
        latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
        conditioning = _conditioning(pipe, prompt, images, (height, width))
        pipe.scheduler.set_timesteps(steps, device=device)
        timesteps = pipe.scheduler.timesteps
        ba.latent_hw = shape[-2:]
        reported = 0

        def report():
            nonlocal reported
            if callback is not None:
                for entry in ba.losses[reported:]:
                    callback(*entry)
            reported = len(ba.losses)

        latents = ba.guide(latents * sigma, 0, timesteps[0], conditioning) / sigma
        report()

        def on_step_end(pipeline, i, t, kwargs):
            x = kwargs["latents"]
            if i + 1 < min(options.guidance_steps, len(pipeline.scheduler.timesteps)):
                x = ba.guide(x, i + 1, pipeline.scheduler.timesteps[i + 1], conditioning)
                report()
            return {"latents": x}

        out = pipe(prompt, latents=latents, callback_on_step_end=on_step_end, **call).images
        masks = ba.masks if ba.masks is not None else ba.layer_masks(ba.mask_grid or _grid(pipe, ba, shape), images,
                                                                    "cpu")
        grid = ba.mask_grid or _grid(pipe, ba, shape)
        result = LayoutResult(np.asarray(out, dtype=np.float32),
                              masks.detach().cpu().view(images, len(subjects), *grid), list(ba.losses), ba.tokens,
                              list(ba.refined))
    if not finite(result.images).all():
        raise ValueError("the layout run came out non-finite (NaN/inf)")
    return result


def _grid(pipe, ba: BoundedAttention, shape) -> tuple[int, int]:
    """The grid of the mask layers (or of the loss layers for layout guidance) for a latent of ``shape``."""
    factors = downsampling(pipe.unet)
    names = ba.mask_layers or ba.loss_layers
    f = factors.get(next(iter(names)), 1) if names else 1
    return max(1, shape[-2] // f), max(1, shape[-1] // f)


def layout_guidance(pipe, prompt: str, subjects: Sequence[Subject], options: BoundedOptions = LAYOUT_GUIDANCE,
                    **kw) -> LayoutResult:
    """Chen et al.'s backward layout guidance: the cross-attention loss on the latents, no masks."""
    return bounded(pipe, prompt, subjects, replace(options, masks=False, self_loss=0.0), **kw)


def overlay(image: np.ndarray, subjects: Sequence[Subject], masks: torch.Tensor | None = None, size: int = 256,
            alpha: float = 0.35):
    """The image (H, W, 3 in [0, 1]) enlarged to ``size``, each subject's mask (S, h, w) tinted and its box drawn
    in its own colour, with its words."""
    from PIL import Image, ImageDraw

    from ..grid import _font
    from ..segment import PALETTE

    base = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    scale = max(1, round(size / max(base.size)))
    base = base.resize((base.width * scale, base.height * scale), Image.NEAREST)
    W, H = base.size
    if masks is not None and masks.numel():
        for s, mask in enumerate(masks):
            m = Image.fromarray((mask.cpu().numpy() * 255).astype(np.uint8)).resize((W, H), Image.NEAREST)
            tint = Image.new("RGB", (W, H), PALETTE[s % len(PALETTE)])
            base = Image.composite(Image.blend(base, tint, alpha), base, m)
    draw = ImageDraw.Draw(base)
    font = _font(max(10, W // 24))
    for s, subject in enumerate(subjects):
        x0, y0, x1, y1 = subject.box
        colour = PALETTE[s % len(PALETTE)]
        box = (round(x0 * W), round(y0 * H), round(x1 * W) - 1, round(y1 * H) - 1)
        draw.rectangle(box, outline=colour, width=max(1, W // 128))
        draw.text((box[0] + 3, box[1] + 2), subject.words, fill=colour, font=font)
    return base
