"""Label maps <-> Label Studio result items (brush RLE, polygons, rectangles).

Predictions go out as one region per connected instance, because annotators fix
objects one by one; annotations come back in as a label map, because that is
what SegGPT takes as a prompt. Coordinates follow Label Studio: polygons and
rectangles in percent of the image size, polygon vertices at pixel centres.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterable

import cv2
import numpy as np
from label_studio_sdk.converter import brush

from backend.label_config import ControlSpec

_ALPHA_THRESHOLD = 128  # a painted pixel counts once it is at least half opaque
_DECIMALS = 4  # 1e-4 % of a 10k-pixel side is 0.01 px


def label_map_to_results(
    label_map: np.ndarray,
    scores: np.ndarray | None,
    control: ControlSpec,
    min_area: int = 64,
    polygon_max_points: int = 100,
) -> list[dict]:
    """One result item per connected instance (8-connectivity) of at least ``min_area`` pixels.

    ``scores`` is ``(L + 1, H, W)`` per-label confidence; a region's ``score`` is the
    mean of its label's map over the region (omitted when ``scores`` is None).
    """
    label_map = _checked_label_map(label_map, len(control.labels))
    height, width = label_map.shape
    if scores is not None and scores.shape != (len(control.labels) + 1, height, width):
        raise ValueError(f"scores have shape {scores.shape}, expected {(len(control.labels) + 1, height, width)}")
    results = []
    for label_id in np.unique(label_map):
        if label_id == 0:
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats(
            (label_map == label_id).astype(np.uint8), connectivity=8
        )
        for k in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[k])
            if area < max(min_area, 1):
                continue
            inside = components[y : y + h, x : x + w] == k
            value = _region_value(control.kind, inside, x, y, width, height, polygon_max_points)
            value[control.kind] = [control.labels[label_id - 1]]
            item: dict[str, Any] = {
                "id": uuid.uuid4().hex[:10],
                "from_name": control.name,
                "to_name": control.to_name,
                "type": control.kind,
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": value,
            }
            if scores is not None:
                item["score"] = float(scores[label_id, y : y + h, x : x + w][inside].mean())
            results.append(item)
    return results


def prediction_score(results: Iterable[dict]) -> float:
    """Prediction-level score for Label Studio: the mean region score (0.0 without regions)."""
    region_scores = [float(r["score"]) for r in results if "score" in r]
    return float(np.mean(region_scores)) if region_scores else 0.0


def results_to_label_map(results: list[dict], control: ControlSpec, height: int, width: int) -> np.ndarray:
    """Rasterise the result items of ``control`` into an ``int32`` label map (0 = background).

    Items of other controls are ignored; where regions overlap, the later one wins.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    label_map = np.zeros((height, width), dtype=np.int32)
    label_ids = {label: i + 1 for i, label in enumerate(control.labels)}
    for item in results:
        if item.get("from_name") != control.name:
            continue
        kind = item.get("type")
        value = item.get("value")
        if not isinstance(kind, str) or kind not in _RASTERISERS or not isinstance(value, dict):
            raise ValueError(f"result of {control.name!r} has unsupported type {kind!r}")
        names = value.get(kind) or []
        if not isinstance(names, list):
            raise ValueError(f"result of {control.name!r} has a malformed {kind!r} list")
        if not names:
            continue  # an unlabelled region carries no class
        label = names[0]
        if not isinstance(label, str) or label not in label_ids:
            raise ValueError(f"result of {control.name!r} uses unknown label {label!r}")
        mask = _RASTERISERS[kind](value, height, width)
        label_map[mask] = label_ids[label]
    return label_map


def _checked_label_map(label_map: np.ndarray, num_labels: int) -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or label_map.dtype.kind not in "iu":
        raise ValueError(f"label map must be a 2-D integer array, got {label_map.dtype} {label_map.shape}")
    if label_map.size and (label_map.min() < 0 or label_map.max() > num_labels):
        raise ValueError(f"label map values must lie in 0..{num_labels}, got {label_map.min()}..{label_map.max()}")
    return label_map


def _region_value(kind: str, inside: np.ndarray, x: int, y: int, width: int, height: int, max_points: int) -> dict:
    if kind == "brushlabels":
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[y : y + inside.shape[0], x : x + inside.shape[1]][inside] = 255  # the frontend paints alpha
        return {"format": "rle", "rle": brush.mask2rle(mask)}
    if kind == "polygonlabels":
        points = _outline(inside, max_points)
        if points is None:  # a one-pixel-wide instance has no area between pixel centres:
            h, w = inside.shape  # outline its box just inside the pixel edges instead
            lo, right, bottom = -0.49, w - 0.51, h - 0.51
            points = np.array([[lo, lo], [right, lo], [right, bottom], [lo, bottom]])
        return {
            "points": [[_pct(px + x + 0.5, width), _pct(py + y + 0.5, height)] for px, py in points],
            "closed": True,
        }
    if kind == "rectanglelabels":
        h, w = inside.shape
        return {
            "x": _pct(x, width),
            "y": _pct(y, height),
            "width": _pct(w, width),
            "height": _pct(h, height),
            "rotation": 0,
        }
    raise ValueError(f"unsupported control kind {kind!r}")


def _outline(inside: np.ndarray, max_points: int) -> np.ndarray | None:
    """Outer contour through pixel centres, simplified until it has at most ``max_points``."""
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    points, epsilon = contour, 0.5
    while len(points) > max_points:
        points = cv2.approxPolyDP(contour, epsilon, closed=True)
        epsilon *= 1.5
    return points.reshape(-1, 2).astype(float) if len(points) >= 3 else None


def _pct(pixels: float, size: int) -> float:
    return round(float(pixels) / size * 100.0, _DECIMALS)


def _brush_mask(value: dict, height: int, width: int) -> np.ndarray:
    if value.get("format", "rle") != "rle":
        raise ValueError(f"brush result has format {value.get('format')!r}; only 'rle' is supported")
    rle = np.asarray(value.get("rle"))
    if rle.ndim != 1 or rle.size < 7 or rle.dtype.kind not in "iu" or rle.min() < 0 or rle.max() > 255:
        raise ValueError("invalid brush RLE: expected a list of byte values")
    count = int.from_bytes(bytes(rle[:4].astype(np.uint8)), "big")
    if count != height * width * 4:
        raise ValueError(
            f"invalid brush RLE: it holds {count} values, but a {width}x{height} RGBA image has {height * width * 4}"
        )
    if rle[4] >> 3 != 7:
        raise ValueError("invalid brush RLE: word size is not 8 bits")
    try:
        flat = brush.decode_rle(rle.tolist())
    except (ValueError, IndexError, OverflowError):
        raise ValueError("invalid brush RLE: truncated or corrupt bit stream") from None
    return flat.reshape(height, width, 4)[:, :, 3] >= _ALPHA_THRESHOLD


def _polygon_mask(value: dict, height: int, width: int) -> np.ndarray:
    points = _finite_array(value.get("points"), "polygon points")
    if points.ndim != 2 or points.shape[0] < 3 or points.shape[1] != 2:
        raise ValueError("invalid polygon: expected at least three [x, y] points")
    pixels = points / 100.0 * (width, height) - 0.5  # pixel i is centred on i + 0.5
    return _fill(pixels, height, width)


def _rectangle_mask(value: dict, height: int, width: int) -> np.ndarray:
    x, y, w, h = _finite_array([value.get(k) for k in ("x", "y", "width", "height")], "rectangle")
    (rotation,) = _finite_array([value.get("rotation", 0)], "rectangle rotation", limit=1e6)
    left, top, w, h = x / 100 * width, y / 100 * height, w / 100 * width, h / 100 * height
    # Label Studio rotates clockwise (y points down) around the top-left corner.
    theta = np.deg2rad(rotation)
    along, across = np.array([np.cos(theta), np.sin(theta)]), np.array([-np.sin(theta), np.cos(theta)])
    corner = np.array([left, top])
    corners = np.stack([corner, corner + w * along, corner + w * along + h * across, corner + h * across])
    if rotation % 90 == 0:  # axis-aligned: slice exactly, fillPoly would add a row on pixel-edge ties
        (x0, y0), (x1, y1) = np.clip(np.round(corners.min(0)), 0, None), np.clip(np.round(corners.max(0)), 0, None)
        mask = np.zeros((height, width), dtype=bool)
        mask[int(y0) : int(y1), int(x0) : int(x1)] = True
        return mask
    return _fill(corners - 0.5, height, width)


def _fill(pixels: np.ndarray, height: int, width: int, shift: int = 8) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(pixels * (1 << shift)).astype(np.int32)], 1, shift=shift)
    return mask.astype(bool)


def _finite_array(values: Any, what: str, limit: float = 1000.0) -> np.ndarray:
    """Numbers within +-``limit`` (percent), so that rasterising cannot overflow."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"invalid {what}: expected numbers") from None
    if not np.all(np.isfinite(array)):
        raise ValueError(f"invalid {what}: expected finite numbers")
    if array.size and np.abs(array).max() > limit:
        raise ValueError(f"invalid {what}: coordinates far outside the image")
    return array


_RASTERISERS = {"brushlabels": _brush_mask, "polygonlabels": _polygon_mask, "rectanglelabels": _rectangle_mask}
