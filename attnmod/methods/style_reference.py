"""Saved StyleAligned references: compute a reference once, replay it for any number of batches.

    ref = compute_reference(pipe, "a red circle, on a striped yellow background", seed=0, steps=20, guidance=3)
    ref.save("ref.safetensors")                      # later, in another process:
    ref = StyleReference.load("ref.safetensors")
    images = generate_style_set(pipe, ["a blue star", "a green square"], saved_reference=ref, steps=20, guidance=3)

What a target needs from its reference at each UNet call (one per denoising step), and all that is saved: in
every shared self-attention layer the reference's keys and values (all its tokens) and its queries' per-channel
mean and std over tokens (the AdaIN target of the targets' queries; the keys' and values' follow from the saved
keys and values), and, for shared GroupNorm statistics, every GroupNorm's per-group mean and variance of the
reference's input — each for both CFG rows of the reference (unconditional and conditional). Nothing of the
reference depends on the targets (it attends to itself only), so a batch replaying these runs the targets alone:
the reference is neither inverted nor generated again, and adds no rows to the batch. Each UNet call checks its
timestep against the saved one.

Size: per step, the keys and values of every shared layer, for two CFG rows — about 1 MiB per step on the embedded
model (fp32), about 180 MiB per step for SD1.5 at 512x512 (half in fp16); restricting ``blocks`` saves less.
The file records the model (its reference and fingerprint, ``attnmod.loading``), size, step count, scheduler,
timesteps and guidance; a reference only replays with the same, and a checksum guards its tensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from .style_aligned import StyleAlignedOptions, calc_mean_std, group_statistics, style_aligned

FORMAT = "attnmod-style-reference"
VERSION = "1"
_ATTENTION_PARTS = ("k", "v", "q_mean", "q_std")
_NORM_PARTS = ("gn_mean", "gn_var")
_PUBLISHED = StyleAlignedOptions()


@dataclass(frozen=True)
class ReferenceInfo:
    """What a saved reference was made with (all of it checked before a batch replays it)."""

    prompt: str
    negative_prompt: str
    seed: int | None  # a generated reference's seed; None for an inverted image
    source: str  # "generated" or "inverted"
    model: str  # attnmod.loading.model_reference ("" when not given)
    model_id: str  # attnmod.loading.model_fingerprint ("" for hub ids and in-process models)
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str  # the scheduler's class name
    timesteps: tuple[float, ...]  # one per UNet call
    copies: int  # CFG rows of the reference: 2 with guidance > 1, else 1
    layers: tuple[str, ...]  # the shared self-attention layers saved
    group_norms: tuple[str, ...]
    dtype: str
    options: dict  # the StyleAlignedOptions it was computed under (for the record)

    @classmethod
    def from_json(cls, text: str) -> ReferenceInfo:
        kinds = {"seed": (int, type(None)), "guidance": (int, float), "timesteps": list, "layers": list,
                 "group_norms": list, "options": dict}
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("its info is not a JSON object")
        for f in fields(cls):
            kind = kinds.get(f.name, int if f.type == "int" else str)
            if not isinstance(data.get(f.name), kind) or (kind is int and isinstance(data[f.name], bool)):
                raise ValueError(f"info field {f.name} is missing or of the wrong type")
        return cls(**{**data, "timesteps": tuple(float(t) for t in data["timesteps"]),
                      "layers": tuple(data["layers"]), "group_norms": tuple(data["group_norms"])})


def _key(call: int, name: str, part: str) -> str:
    return f"{call}/{name}/{part}"


def _expected_keys(info: ReferenceInfo) -> set[str]:
    keys = {"image"}
    for call in range(len(info.timesteps)):
        keys |= {_key(call, n, p) for n in info.layers for p in _ATTENTION_PARTS}
        keys |= {_key(call, n, p) for n in info.group_norms for p in _NORM_PARTS}
    return keys


def _digest(keys, get) -> str:
    """sha256 over the tensors in key order: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(keys):
        t = get(key).contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _timestep(value) -> float:
    return float(torch.as_tensor(value).flatten()[0])


class StyleReference:
    """A reference's per-step features (see the module doc), its image (H, W, 3) in [0, 1] and ``info``."""

    def __init__(self, info: ReferenceInfo, image: np.ndarray, tensors: dict[str, torch.Tensor] | None = None, *,
                 file=None, name: str = "the saved reference"):
        self.info = info
        self.image = image
        self._tensors = tensors
        self._file = file  # a safetensors handle: tensors are read per step, not held
        self.name = name

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key] if self._tensors is not None else self._file.get_tensor(key)

    def _shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._file.get_slice(key).get_shape())

    # -- files ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file (atomically): the tensors, and the info and a checksum as metadata."""
        from safetensors.torch import save

        from ..recipe import atomic_write

        keys = _expected_keys(self.info)
        tensors = {k: self.tensor(k).contiguous() for k in keys}
        metadata = {"format": FORMAT, "version": VERSION, "info": json.dumps(asdict(self.info)),
                    "digest": _digest(keys, tensors.__getitem__)}
        data = save(tensors, metadata=metadata)
        return atomic_write(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str | Path) -> StyleReference:
        """Open a saved reference, checking it whole (format, info, tensors, checksum); one-line errors."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise ValueError(f"no saved reference at {path}")
        try:
            f = safe_open(str(p), framework="pt")
            meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error type for a bad header or a truncated file
            raise ValueError(f"{path} is not a readable saved reference ({' '.join(str(e).split())})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved StyleAligned reference (attnmod style --save-reference "
                             "writes them)")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path} is a saved reference of format version {meta.get('version')}; this attnmod "
                             f"reads version {VERSION}")
        try:
            info = ReferenceInfo.from_json(meta.get("info", ""))
            keys = set(f.keys())
            expected = _expected_keys(info)
            if keys != expected:
                raise ValueError(f"{len(expected - keys)} tensors missing, {len(keys - expected)} unexpected")
            if _digest(keys, f.get_tensor) != meta.get("digest"):
                raise ValueError("its tensors do not match their checksum")
            image = f.get_tensor("image").float().numpy()
            if image.shape != (info.height, info.width, 3):
                raise ValueError(f"its image is {image.shape}, not ({info.height}, {info.width}, 3)")
        except (ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is a corrupt saved reference ({' '.join(str(e).split())})") from None
        return cls(info, image, file=f, name=str(path))

    # -- checks ---------------------------------------------------------------------------------------------

    def check(self, *, model: str | None = None, width: int | None = None, height: int | None = None,
              steps: int | None = None, guidance: float | None = None) -> None:
        """One-line errors where a run differs from what the reference was made with (``None``: not checked).
        The model matches by fingerprint where both have one, else by its reference (alias, hub id, path)."""
        from ..loading import model_fingerprint, model_reference

        i, name = self.info, self.name
        if model is not None:
            ref, ident = model_reference(model), model_fingerprint(model)
            same = ident == i.model_id if ident and i.model_id else ref == i.model
            if not same:
                had = i.model + (f" (id {i.model_id})" if i.model_id else "")
                has = ref + (f" (id {ident})" if ident else "")
                raise ValueError(f"{name} was made with the model {had}; this run uses {has}: a reference only "
                                 "replays on its own model")
        if width is not None and (width, height) != (i.width, i.height):
            raise ValueError(f"{name} is {i.width}x{i.height}; this run makes {width}x{height} images")
        if steps is not None and steps != i.steps:
            raise ValueError(f"{name} was made with {i.steps} steps; this run asks for {steps}")
        if guidance is not None and guidance != i.guidance:
            raise ValueError(f"{name} was made at guidance {i.guidance:g}; this run asks for {guidance:g}")

    def check_run(self, pipe, *, width: int, height: int, steps: int, guidance: float) -> None:
        """``check`` plus the pipeline's scheduler: its class and the timesteps it will visit."""
        self.check(width=width, height=height, steps=steps, guidance=guidance)
        scheduler = type(pipe.scheduler).__name__
        if scheduler != self.info.scheduler:
            raise ValueError(f"{self.name} was made with {self.info.scheduler}; this pipeline uses {scheduler}")
        fresh = type(pipe.scheduler).from_config(pipe.scheduler.config)
        fresh.set_timesteps(steps)
        timesteps = tuple(float(t) for t in fresh.timesteps)
        if timesteps != self.info.timesteps:
            raise ValueError(f"{self.name} visited other timesteps (its scheduler was configured differently)")

    def check_unet(self, unet, layers: list[str], group_norms: list[str]) -> None:
        """Every layer that shares and every GroupNorm that shares statistics has saved features that fit."""
        missing = [n for n in layers if n not in self.info.layers]
        if missing:
            raise ValueError(f"{self.name} has no features for {len(missing)} of the shared layers (e.g. "
                             f"{missing[0]}): it was saved with blocks={self.info.options.get('blocks')!r}, "
                             f"only_self_level={self.info.options.get('only_self_level')}")
        if [n for n in group_norms if n not in self.info.group_norms]:
            raise ValueError(f"{self.name} has no GroupNorm statistics for this model (another model?)")
        modules = dict(unet.named_modules())
        for n in layers:
            copies, heads, _, dim = self._shape(_key(0, n, "k"))
            if heads != modules[n].heads or heads * dim != modules[n].to_k.out_features:
                raise ValueError(f"{self.name}'s layer {n} has {heads} heads of {dim}; this model's has "
                                 f"{modules[n].heads} (another model?)")

    def player(self) -> _Player:
        return _Player(self)


class _Player:
    """The replay state of one ``style_aligned`` context: the current UNet call's features, read on demand."""

    def __init__(self, reference: StyleReference):
        self.ref = reference
        self.call = -1
        self.device, self.dtype = "cpu", torch.float32
        self._cache: dict[str, object] = {}

    def begin_call(self, timestep, device, dtype) -> None:
        timesteps = self.ref.info.timesteps
        self.call = (self.call + 1) % len(timesteps)  # a new pipeline call starts over
        t, expected = _timestep(timestep), timesteps[self.call]
        if abs(t - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ValueError(f"UNet call {self.call} is at timestep {t:g}; {self.ref.name}'s is at {expected:g} "
                             "(another scheduler or step count)")
        self.device, self.dtype = device, dtype
        self._cache = {}

    def attention(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._cache:
            self._cache[name] = {p: self.ref.tensor(_key(self.call, name, p)).to(self.device, self.dtype)
                                 for p in _ATTENTION_PARTS}
        return self._cache[name]

    def group_norm(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.ref.tensor(_key(self.call, name, p)).to(self.device) for p in _NORM_PARTS)


class _Recorder:
    """Collects the reference rows' features during a ``style_aligned`` run (``recorder=``)."""

    def __init__(self):
        self.call = -1
        self.timesteps: list[float] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.layers: dict[str, None] = {}
        self.group_norms: dict[str, None] = {}

    def begin_call(self, timestep) -> None:
        self.call += 1
        self.timesteps.append(_timestep(timestep))

    def _keep(self, name: str, part: str, t: torch.Tensor) -> None:
        self.tensors[_key(self.call, name, part)] = t.detach().to("cpu", copy=True).contiguous()

    def attention(self, name: str, q, k, v) -> None:
        self.layers[name] = None
        mean, std = calc_mean_std(q)  # NaN for a single token: never used there (AdaIN leaves such layers)
        for part, t in zip(_ATTENTION_PARTS, (k, v, mean, std), strict=True):
            self._keep(name, part, t)

    def group_norm(self, name: str, module, x) -> None:
        self.group_norms[name] = None
        for part, t in zip(_NORM_PARTS, group_statistics(x, module.num_groups), strict=True):
            self._keep(name, part, t)


def compute_reference(pipe, prompt: str, *, seed: int = 0, steps: int = 20, guidance: float = 7.5,
                      width: int | None = None, height: int | None = None, negative_prompt: str = "",
                      image=None, options: StyleAlignedOptions = _PUBLISHED,
                      model: str | None = None) -> StyleReference:
    """Run the reference alone once (``prompt`` from ``seed``, or — with ``image``, a PIL image that ``prompt``
    describes — that image DDIM-inverted and replayed, as ``generate_style_set`` does) and keep what targets need
    from it at every step. ``model`` (a name ``load_pipeline`` takes) is recorded so that files saved from it are
    checked against the model they are replayed on. Features are kept for the layers ``options`` shares."""
    from ..inversion.ddim import ddim_invert, replay_reference
    from ..loading import model_fingerprint, model_reference

    if getattr(pipe, "controlnet", None) is not None:
        raise ValueError("compute the reference with the pipeline without ControlNet (the reference gets no "
                         "control)")
    options = replace(options, reference=0)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or side, height or side
    if image is not None:
        trajectory = ddim_invert(pipe, image, prompt, steps=steps)
        extra = {"latents": trajectory[-1].to(pipe.unet.device, pipe.unet.dtype),
                 "callback_on_step_end": replay_reference(trajectory, 0)}
    else:
        extra = {"generator": [torch.Generator().manual_seed(seed)]}
    recorder = _Recorder()
    with style_aligned(pipe, images=1, options=options, recorder=recorder), torch.inference_mode():
        out = pipe([prompt], negative_prompt=[negative_prompt] if negative_prompt else None, num_inference_steps=steps,
                   guidance_scale=guidance, width=width, height=height, output_type="np", **extra)
    first = recorder.tensors[_key(0, next(iter(recorder.layers)), "k")] if recorder.layers else None
    info = ReferenceInfo(
        prompt=prompt, negative_prompt=negative_prompt, seed=None if image is not None else seed,
        source="inverted" if image is not None else "generated", model=model_reference(model) if model else "",
        model_id=model_fingerprint(model) if model else "", width=width, height=height, steps=steps,
        guidance=float(guidance), scheduler=type(pipe.scheduler).__name__, timesteps=tuple(recorder.timesteps),
        copies=first.shape[0] if first is not None else 1 + (guidance > 1), layers=tuple(recorder.layers),
        group_norms=tuple(recorder.group_norms), dtype=str(pipe.unet.dtype).removeprefix("torch."),
        options=asdict(options))
    image_out = np.asarray(out.images[0], dtype=np.float32)
    return StyleReference(info, image_out, {**recorder.tensors, "image": torch.from_numpy(image_out.copy())})
