"""Pre- and post-processing: images and label maps in, canvases out, paintings back to label maps."""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .modeling import IMAGENET_MEAN, IMAGENET_STD
from .refine import label_argmax, refine_edges

MAX_LABELS = 32
_SCORE_TEMPERATURE = 0.02  # in squared [0, 1] RGB distance; palette neighbours are >= 0.11 apart


@lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """(MAX_LABELS + 1, 3) uint8 colours: 0 = black background, then greedy farthest colours.

    Farthest-point sampling on a 4-level RGB grid keeps every pair at least 85 apart, and
    the first labels (the common case) get the most distinct colours (white, then primaries).
    """
    levels = (0, 85, 170, 255)
    grid = np.array(list(itertools.product(levels, repeat=3)), dtype=np.float64)
    chosen = [0]
    dist = np.linalg.norm(grid - grid[0], axis=1)
    for _ in range(MAX_LABELS):
        nxt = int(np.argmax(dist))  # ties resolve to the lowest index: deterministic
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(grid - grid[nxt], axis=1))
    return grid[chosen].astype(np.uint8)


def to_rgb_array(image) -> np.ndarray:
    """HxWx3 uint8 from a PIL image or an array; EXIF orientation is the caller's business.

    Grey, palette, alpha and 16-bit images are converted explicitly (16-bit is scaled,
    not clipped); anything ambiguous raises ``ValueError``.
    """
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError("image has zero size")
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            return to_rgb_array(np.asarray(image))
        if image.mode == "F":
            raise ValueError("32-bit float images are not supported; convert to 8-bit RGB first")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            flat = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(flat, image)
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError("image has zero size")
    if a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.dtype != np.uint8):
        if a.min() < 0 or a.max() > 65535:
            raise ValueError("integer image values must lie in 0..65535")
        a = (a.astype(np.float64) / 257.0).round().astype(np.uint8) if a.max() > 255 else a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (or 16-bit), got {a.dtype}")
    if a.shape[2] == 4:
        a = a[..., :3]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def to_label_map(label_map, num_labels: int = MAX_LABELS) -> np.ndarray:
    """HxW int64 label ids from an array or a PIL image of ids (mode L, P, I)."""
    if isinstance(label_map, Image.Image):
        if label_map.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"label map image must hold label ids (mode L, P or I), got mode {label_map.mode}")
        label_map = np.asarray(label_map)
    a = np.asarray(label_map)
    if a.ndim != 2:
        raise ValueError(f"label map must be HxW, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("label map has zero size")
    if a.dtype == bool:
        a = a.astype(np.int64)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise ValueError("label map must hold whole-number label ids")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"label map must be integer, got {a.dtype}")
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() > num_labels:
        raise ValueError(f"label ids must lie in 0..{num_labels}, got {int(a.min())}..{int(a.max())}")
    return a


def colorize(label_map: np.ndarray) -> np.ndarray:
    """Label ids -> HxWx3 uint8 palette colours (the prompt mask SegGPT sees)."""
    return palette()[label_map]


def resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (3, H, W) ImageNet-normalised float32."""
    t = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std


def denormalize(t: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalised -> RGB in [0, 1] (float32)."""
    mean = torch.tensor(IMAGENET_MEAN, device=t.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=t.device).view(3, 1, 1)
    return (t.float() * std + mean).clamp_(0, 1)


def stack_canvas(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Prompt above query: (3, S, S) x 2 -> (3, 2S, S)."""
    return torch.cat([top, bottom], dim=-2)


def label_scores(painted: torch.Tensor, num_labels: int) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> (..., num_labels + 1, H, W) scores summing to 1.

    A softmax over negative squared distances to the palette colours: its argmax is the
    nearest palette colour, and its value says how clearly the pixel was painted.
    """
    colours = torch.from_numpy(palette()[: num_labels + 1]).to(painted.device).float() / 255
    d2 = ((painted.unsqueeze(-4) - colours.view(-1, 3, 1, 1)) ** 2).sum(dim=-3)
    return torch.softmax(-d2 / _SCORE_TEMPERATURE, dim=-3)


def decode(painted: torch.Tensor, num_labels: int, size: tuple[int, int], guide: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Query half (3, S, S) normalised -> (label map HxW int32, scores (L+1)xHxW) at ``size`` (H, W)."""
    return decode_scores(label_scores(denormalize(painted), num_labels), size, guide)


def decode_scores(scores: torch.Tensor, size: tuple[int, int], guide: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(L+1, h, w) scores -> (label map HxW int32, scores (L+1)xHxW): upsampled once to ``size`` (H, W).

    ``guide``: the HxWx3 image, whose edges then refine the upsampled scores (``refine.py``).
    """
    h, w = scores.shape[-2:]
    scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    if guide is not None:
        scores = refine_edges(scores, guide, max(size[0] / h, size[1] / w))
    return label_argmax(scores).cpu().numpy(), scores.cpu().numpy()


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The picture a person wants: the image with labelled pixels tinted in palette colours."""
    colours = colorize(label_map).astype(np.float32)
    out = image.astype(np.float32)
    fg = label_map > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return out.round().astype(np.uint8)


def mask_file_to_label_map(image: Image.Image) -> np.ndarray:
    """Read a mask file as people make them: label ids, a 0/255 binary mask, or colours.

    Each distinct non-black colour of an RGB mask becomes one label (in order of first
    appearance by colour value); a mask with only 0 and 255 becomes background/label 1.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("L", "P", "I", "I;16", "1"):
        ids = np.asarray(image.convert("L") if image.mode == "1" else image).astype(np.int64)
        values = np.unique(ids)
        if set(values.tolist()) <= {0, 255}:
            return (ids == 255).astype(np.int64)
        return to_label_map(ids)
    rgb = to_rgb_array(image)
    colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    ids = np.zeros(len(colours), dtype=np.int64)
    fg = [i for i, c in enumerate(colours) if c.any()]
    if len(fg) > MAX_LABELS:
        raise ValueError(f"mask has {len(fg)} colours; at most {MAX_LABELS} labels are supported")
    ids[fg] = np.arange(1, len(fg) + 1)
    return ids[inverse.reshape(-1)].reshape(rgb.shape[:2])
