"""A tiny, obvious API over SegGPT: images and label maps in, a label map out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import processing as P
from .fast import FastPainter
from .modeling import SegGPT
from .tuning import TunedPrompt
from .weights import model_fingerprint

Prompt = tuple[object, object]  # (image, label map)


@dataclass
class Prediction:
    label_map: np.ndarray  # HxW int32 at the query's original size, 0 = background
    scores: np.ndarray  # (num_labels + 1, H, W) float32 in [0, 1]


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
    (default) paints with ``FastPainter``; ``fast=False`` runs the reference forward.
    """

    def __init__(self, model: SegGPT, device: str | torch.device | None = None,
                 dtype: str | torch.dtype = torch.float32, batch_size: int = 8, fast: bool = True) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.fingerprint = model_fingerprint(model)  # before the cast: the same weights, one id in any dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.batch_size = batch_size
        self._fast = FastPainter(self.model) if fast else None

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def predict(self, query, prompts: Sequence[Prompt] = (), num_labels: int | None = None,
                seg_type: str = "instance", tuned: TunedPrompt | None = None) -> Prediction:
        return self.predict_batch([query], prompts, num_labels=num_labels, seg_type=seg_type, tuned=tuned)[0]

    def prepare_prompts(self, prompts: Sequence[Prompt], tuned: TunedPrompt | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(K, 3, S, S) normalised prompt images and colour-coded masks, and the label count.

        A tuned prompt, when given, comes first and joins the examples in the ensemble.
        """
        if not prompts and tuned is None:
            raise ValueError("at least one (image, label map) prompt or a tuned prompt is needed")
        images, masks, top = [], [], 0
        if tuned is not None:
            if tuple(tuned.image.shape) != (3, self.image_size, self.image_size):
                raise ValueError(f"tuned prompt is {tuple(tuned.image.shape)}, this model needs "
                                 f"(3, {self.image_size}, {self.image_size})")
            images.append(tuned.image.float().cpu())
            masks.append(tuned.mask.float().cpu())
            top = tuned.num_labels
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
            top = max(top, int(labels.max()))
            images.append(P.normalize(P.resize_image(rgb, self.image_size)))
            masks.append(P.normalize(P.resize_mask(P.colorize(labels), self.image_size)))
        return torch.stack(images), torch.stack(masks), top

    @torch.inference_mode()
    def predict_batch(self, queries: Sequence, prompts: Sequence[Prompt] = (), num_labels: int | None = None,
                      seg_type: str = "instance", tuned: TunedPrompt | None = None) -> list[Prediction]:
        """Label maps for each query, all in context of the same prompts (and tuned prompt)."""
        if seg_type not in ("instance", "semantic"):
            raise ValueError(f"seg_type must be 'instance' or 'semantic', got {seg_type!r}")
        p_img, p_mask, top = self.prepare_prompts(prompts, tuned)
        num_labels = max(num_labels or 0, top, 1)
        if num_labels > P.MAX_LABELS:
            raise ValueError(f"at most {P.MAX_LABELS} labels are supported, got {num_labels}")
        rgbs = [P.to_rgb_array(q) for q in queries]
        k = p_img.shape[0]
        per_pass = max(1, self.batch_size // k)
        out: list[Prediction] = []
        for start in range(0, len(rgbs), per_pass):
            chunk = rgbs[start:start + per_pass]
            q = torch.stack([P.normalize(P.resize_image(r, self.image_size)) for r in chunk])
            painted = self.paint(q, p_img, p_mask, seg_type)
            for rgb, pq in zip(chunk, painted):
                out.append(Prediction(*P.decode(pq, num_labels, rgb.shape[:2])))
        return out

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
