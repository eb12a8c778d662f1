"""A tiny, obvious API over SegGPT: images and label maps in, a label map out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from . import processing as P
from . import tiling as T
from .fast import FastPainter
from .modeling import SegGPT
from .tuning import TunedPrompt
from .weights import model_fingerprint

Prompt = tuple[object, object]  # (image, label map)
TilingMode = Literal["auto", "off"]


@dataclass(frozen=True)
class Tiling:
    """How a query was painted: ``tiles`` windows of ``scale`` px (one tile = the whole image, its
    longer side), in context of ``prompt_crops`` prompt canvases (the ensemble's K), and why."""

    scale: int
    tiles: int
    prompt_crops: int
    reason: str  # "off", or tiling.plan_query's reason


@dataclass
class Prediction:
    label_map: np.ndarray  # HxW int32 at the query's original size, 0 = background
    scores: np.ndarray  # (num_labels + 1, H, W) float32 in [0, 1]
    tiling: Tiling | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None picks CUDA when present."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def supports_bf16(device: torch.device) -> bool:
    """Native bf16 matmuls: CUDA GPUs with bf16, CPUs with AVX-512 bf16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None: bf16 where the device computes it natively, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if supports_bf16(device) else torch.float32
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    return torch.bfloat16 if dtype == "bf16" else torch.float32


class SegGPTPredictor:
    """Segment queries in context of K >= 1 (image, label map) prompts.

    K > 1 uses SegGPT's feature ensemble; several queries share one forward pass.  ``fast``
    (default) paints with ``FastPainter``; ``fast=False`` runs the reference forward.  ``tiling``:
    the model's working range and tiling budget (default ``TilingConfig.for_model``); ``refine``:
    the default for edge refinement (None: with ``tiling="auto"`` calls only).
    """

    def __init__(self, model: SegGPT, device: str | torch.device | None = None,
                 dtype: str | torch.dtype = torch.float32, batch_size: int = 8, fast: bool = True,
                 tiling: T.TilingConfig | None = None, refine: bool | None = None) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.fingerprint = model_fingerprint(model)  # before the cast: the same weights, one id in any dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.batch_size = batch_size
        self._fast = FastPainter(self.model) if fast else None
        self.tiling = tiling or T.TilingConfig.for_model(model.config)
        self.refine = refine  # the default for calls that leave ``refine`` None

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def predict(self, query, prompts: Sequence[Prompt] = (), num_labels: int | None = None,
                seg_type: str = "instance", tuned: TunedPrompt | None = None,
                tiling: TilingMode = "auto", refine: bool | None = None) -> Prediction:
        return self.predict_batch([query], prompts, num_labels=num_labels, seg_type=seg_type, tuned=tuned,
                                  tiling=tiling, refine=refine)[0]

    def prepare_prompts(self, prompts: Sequence[Prompt], tuned: TunedPrompt | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(K, 3, S, S) normalised prompt images and colour-coded masks, and the label count.

        A tuned prompt, when given, comes first and joins the examples in the ensemble.
        """
        pairs = self._read_prompts(prompts, tuned)
        return (*self._prompt_canvases(pairs, tuned), _top_label(pairs, tuned))

    def _read_prompts(self, prompts: Sequence[Prompt], tuned: TunedPrompt | None
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Validated (HxWx3 uint8, HxW int64) pairs."""
        if not prompts and tuned is None:
            raise ValueError("at least one (image, label map) prompt or a tuned prompt is needed")
        if tuned is not None and tuple(tuned.image.shape) != (3, self.image_size, self.image_size):
            raise ValueError(f"tuned prompt is {tuple(tuned.image.shape)}, this model needs "
                             f"(3, {self.image_size}, {self.image_size})")
        pairs = []
        for i, prompt in enumerate(prompts):
            try:
                image, label_map = prompt
            except (TypeError, ValueError):
                raise ValueError(f"prompt {i} must be an (image, label map) pair") from None
            rgb = P.to_rgb_array(image)
            labels = P.to_label_map(label_map)
            if labels.shape != rgb.shape[:2]:
                raise ValueError(f"prompt {i}: label map is {labels.shape[1]}x{labels.shape[0]} but its image "
                                 f"is {rgb.shape[1]}x{rgb.shape[0]}")
            pairs.append((rgb, labels))
        return pairs

    def _prompt_canvases(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], tuned: TunedPrompt | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 3, S, S) normalised images and colour-coded masks; the tuned prompt first."""
        images = [tuned.image.float().cpu()] if tuned is not None else []
        masks = [tuned.mask.float().cpu()] if tuned is not None else []
        for rgb, labels in pairs:
            images.append(P.normalize(P.resize_image(rgb, self.image_size)))
            masks.append(P.normalize(P.resize_mask(P.colorize(labels), self.image_size)))
        return torch.stack(images), torch.stack(masks)

    @torch.inference_mode()
    def predict_batch(self, queries: Sequence, prompts: Sequence[Prompt] = (), num_labels: int | None = None,
                      seg_type: str = "instance", tuned: TunedPrompt | None = None,
                      tiling: TilingMode = "auto", refine: bool | None = None) -> list[Prediction]:
        """Label maps for each query, all in context of the same prompts (and tuned prompt).

        ``tiling="auto"`` paints each query at the prompts' working scale (``tiling.py``): prompts
        cropped around their objects, the query in overlapping tiles blended before decoding.
        When the objects are large for the image that is one whole-image tile, the same answer
        as ``"off"`` (the whole image on one canvas).  ``Prediction.tiling`` says what was done.
        ``refine`` snaps the upsampled scores to the image's edges (``refine.py``); None means the
        predictor's ``refine``, and if that is None too, on with ``"auto"`` and off with ``"off"``
        (which then stays the whole-image path of before, bit for bit).
        """
        if seg_type not in ("instance", "semantic"):
            raise ValueError(f"seg_type must be 'instance' or 'semantic', got {seg_type!r}")
        if tiling not in ("auto", "off"):
            raise ValueError(f"tiling must be 'auto' or 'off', got {tiling!r}")
        pairs = self._read_prompts(prompts, tuned)
        refine = next(r for r in (refine, self.refine, tiling == "auto") if r is not None)
        num_labels = max(num_labels or 0, _top_label(pairs, tuned), 1)
        if num_labels > P.MAX_LABELS:
            raise ValueError(f"at most {P.MAX_LABELS} labels are supported, got {num_labels}")
        rgbs = [P.to_rgb_array(q) for q in queries]
        out: list[Prediction | None] = [None] * len(rgbs)
        if tiling == "off":
            plans = {i: (None, "off") for i in range(len(rgbs))}
            size = None
        else:
            size = T.object_size([lab for _, lab in pairs])
            plans = {i: T.plan_query(size, rgb.shape[:2], self.image_size, self.tiling) for i, rgb in enumerate(rgbs)}
        for side in sorted({p[0] for p in plans.values()}, key=lambda v: (v is not None, v or 0)):
            members = [i for i, p in plans.items() if p[0] == side]
            prompt_side = side or (None if size is None else T.crop_side(size, self.image_size, self.tiling))
            p_img, p_mask = self._prompt_canvases(self._crop_prompts(pairs, size, prompt_side, tuned is not None),
                                                  tuned)
            if side is None:
                self._predict_whole(rgbs, members, p_img, p_mask, num_labels, seg_type, out, plans, refine)
            else:
                for i in members:
                    out[i] = self._predict_tiled(rgbs[i], side, p_img, p_mask, num_labels, seg_type, plans[i][1],
                                                 refine)
        return out

    def _crop_prompts(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], size: float | None,
                      side: int | None, has_tuned: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """Prompts at the working scale ``side``: whole when already there, else crops around objects.

        Each prompt gives one crop first; further crops (other instances) join the ensemble while
        it has fewer than ``max_prompts`` members.
        """
        if side is None:
            return list(pairs)
        per_prompt = []
        for rgb, labels in pairs:
            own = T.object_size([labels])
            longest = max(labels.shape)
            if longest <= side or T.in_range(own if own is not None else size, longest, self.tiling):
                per_prompt.append([(rgb, labels)])
            else:
                boxes = T.crop_boxes(labels, side, self.tiling.max_prompts)
                per_prompt.append([(rgb[y:y + h, x:x + w], labels[y:y + h, x:x + w]) for y, x, h, w in boxes])
        budget = max(self.tiling.max_prompts - len(pairs) - int(has_tuned), 0)
        extra = [crops[r] for r in range(1, self.tiling.max_prompts) for crops in per_prompt if r < len(crops)]
        return [crops[0] for crops in per_prompt] + extra[:budget]

    def _predict_whole(self, rgbs: list[np.ndarray], members: list[int], p_img: torch.Tensor,
                       p_mask: torch.Tensor, num_labels: int, seg_type: str, out: list,
                       plans: dict[int, tuple[int | None, str]], refine: bool) -> None:
        """The whole-image path: each query resized onto one canvas, several queries per pass."""
        k = p_img.shape[0]
        per_pass = max(1, self.batch_size // k)
        for start in range(0, len(members), per_pass):
            chunk = members[start:start + per_pass]
            q = torch.stack([P.normalize(P.resize_image(rgbs[i], self.image_size)) for i in chunk])
            painted = self.paint(q, p_img, p_mask, seg_type)
            for i, pq in zip(chunk, painted):
                h, w = rgbs[i].shape[:2]
                decoded = P.decode(pq, num_labels, (h, w), rgbs[i] if refine else None)
                out[i] = Prediction(*decoded, Tiling(max(h, w), 1, k, plans[i][1]))

    def _predict_tiled(self, rgb: np.ndarray, side: int, p_img: torch.Tensor, p_mask: torch.Tensor,
                       num_labels: int, seg_type: str, reason: str, refine: bool) -> Prediction:
        """Overlapping ``side`` px tiles, painted in batches, blended at the working resolution, decoded once."""
        h, w = rgb.shape[:2]
        boxes = T.tile_grid((h, w), side, self.tiling.overlap)
        blender = T.ScoreBlender((h, w), boxes, self.image_size, side, num_labels + 1)
        k = p_img.shape[0]
        per_pass = max(1, self.batch_size // k)
        for start in range(0, len(boxes), per_pass):
            q = torch.stack([P.normalize(P.resize_image(rgb[y:y + th, x:x + tw], self.image_size))
                             for y, x, th, tw in boxes[start:start + per_pass]])
            for painted in self.paint(q, p_img, p_mask, seg_type):
                blender.add(P.label_scores(P.denormalize(painted), num_labels))
        label_map, scores = P.decode_scores(blender.result(), (h, w), rgb if refine else None)
        return Prediction(label_map, scores, Tiling(side, len(boxes), k, reason))

    def paint(self, queries: torch.Tensor, p_img: torch.Tensor, p_mask: torch.Tensor,
              seg_type: str = "instance") -> torch.Tensor:
        """(Q, 3, S, S) normalised queries -> (Q, 3, S, S) painted query halves (normalised)."""
        dev = dict(device=self.device, dtype=self.dtype)
        st = int(seg_type == "instance")
        if self._fast is not None:
            return self._fast(p_img.to(**dev), p_mask.to(**dev), queries.to(**dev), seg_type=st).float()
        nq, k = queries.shape[0], p_img.shape[0]
        imgs = torch.cat([p_img.repeat(nq, 1, 1, 1), queries.repeat_interleave(k, 0)], dim=-2)
        tgts = torch.cat([p_mask, p_mask], dim=-2).repeat(nq, 1, 1, 1)
        pred = self.model(imgs.to(**dev), tgts.to(**dev), seg_type=st, feature_ensemble=k > 1, prompts_per_query=k)
        s = self.image_size
        return pred[::k, :, s:].float()


def _top_label(pairs: Sequence[tuple[np.ndarray, np.ndarray]], tuned: TunedPrompt | None) -> int:
    """The highest label id any prompt (or the tuned prompt) carries."""
    top = tuned.num_labels if tuned is not None else 0
    return max([top] + [int(labels.max()) for _, labels in pairs])
