"""The prompt bank: annotated tasks turned into SegGPT prompts (image + label map).

Annotations arrive through webhooks or a one-time backfill from the Label Studio API; each
becomes one entry per task, stored at a bounded working size (SegGPT works at 448 px, so
keeping originals would only cost Redis memory and transfer time).
"""
from __future__ import annotations

import base64
import io
import logging
import time
from datetime import datetime
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from backend.label_config import ControlSpec
from backend.media import MediaError, MediaFetcher
from backend.results import results_to_label_map
from backend.store import PromptEntry, PromptStore
from seggpt_model.retrieval import embed_image

log = logging.getLogger(__name__)

# Long side of stored prompt images and label maps, pixels. Tiling measures the prompts' objects to
# choose the query's tiles, so a prompt must keep the pixel scale of the images it is used with, and
# its crops the detail of small objects: 4096 keeps images up to 16 MP (4:3) whole, at 1-3 MB of JPEG
# per entry. Larger images are stored smaller, and their working scale is then chosen too small.
WORKING_SIZE = 4096
Prompt = tuple[Image.Image, np.ndarray]  # (RGB image, HxW int label map: 0 = background)


class PromptBank:
    """Per-project prompts over a :class:`PromptStore`; images come from a MediaFetcher."""

    def __init__(self, store: PromptStore, media: MediaFetcher, working_size: int = WORKING_SIZE) -> None:
        self.store = store
        self.media = media
        self.working_size = working_size

    def add_annotation(self, project: str, task: dict, annotation: dict,
                       controls: list[ControlSpec]) -> int | None:
        """Make ``annotation`` its task's prompt; returns the new version, None if unchanged.

        A skipped (cancelled) or emptied annotation is no prompt: any entry it made earlier
        is removed. Raises MediaError when the task image cannot be read and ValueError
        when the annotation does not fit the image or the task lacks the image field; the
        reason is recorded for the project (``PromptStore.problems``) until the annotation
        is used or deleted, so predictions can say why there are no prompts.
        """
        key = problem_key(int(annotation["id"]))
        try:
            version = self._add_annotation(project, task, annotation, controls)
        except (MediaError, ValueError) as exc:
            self.store.record_problem(project, key, str(exc), task_id=_task_id(task))
            raise
        self.store.clear_problems(project, [key])
        return version

    def _add_annotation(self, project: str, task: dict, annotation: dict,
                        controls: list[ControlSpec]) -> int | None:
        annotation_id = int(annotation["id"])
        results = annotation.get("result") or []
        used = [c for c in controls if any(r.get("from_name") == c.name for r in results)]
        if annotation.get("was_cancelled") or not used:
            return self.store.remove_annotations(project, [annotation_id], forget=False)
        images: dict[str, bytes] = {}
        maps: dict[str, bytes] = {}
        sizes: dict[str, list[int]] = {}
        embeddings: dict[str, str] = {}
        for key in sorted({c.value_key for c in used}):
            image = self.media.load_image(_task_url(task, key), task_id=task.get("id"))
            width, height = image.size
            size = _working_size(width, height, self.working_size)
            for control in (c for c in used if c.value_key == key):
                label_map = results_to_label_map(results, control, height, width)
                if label_map.any():
                    maps[control.name] = _encode_map(_resize_nearest(label_map, size))
            stored = image.resize(size, Image.Resampling.BILINEAR)
            images[key] = _encode_image(stored)
            sizes[key] = [width, height]
            embeddings[key] = encode_embedding(embed_image(stored))  # once per entry, for prompt selection
        if not maps:
            return self.store.remove_annotations(project, [annotation_id], forget=False)
        entry = PromptEntry(task_id=int(task["id"]), annotation_id=annotation_id,
                            updated_at=_timestamp(annotation.get("updated_at")),
                            images={k: images[k] for k in {c.value_key for c in used if c.name in maps}},
                            label_maps=maps, meta={"original_sizes": sizes, "embeddings": embeddings})
        return self.store.put_entry(project, entry)

    def remove_annotations(self, project: str, annotation_ids: Iterable[int]) -> int | None:
        ids = list(annotation_ids)
        self.store.clear_problems(project, [problem_key(i) for i in ids])
        return self.store.remove_annotations(project, ids)

    def remove_tasks(self, project: str, task_ids: Iterable[int]) -> int | None:
        ids = list(task_ids)
        self.store.clear_problems(project, [], tasks=ids)
        return self.store.remove_tasks(project, ids)

    def prompts(self, project: str, controls: list[ControlSpec], k: int) -> tuple[int, dict[str, list[Prompt]]]:
        """The ``k`` most recent prompts per control (newest first) and their version."""
        version, entries = self.store.snapshot(project, [c.name for c in controls], k)
        keys = {c.name: c.value_key for c in controls}
        decoded: dict[tuple[int, str], Image.Image] = {}
        prompts: dict[str, list[Prompt]] = {}
        for name, picked in entries.items():
            prompts[name] = []
            for entry in picked:
                image = decoded.get((entry.task_id, keys[name]))
                if image is None:
                    image = decoded[entry.task_id, keys[name]] = _decode_image(entry.images[keys[name]])
                prompts[name].append((image, _decode_map(entry.label_maps[name])))
        return version, prompts

    def backfill(self, project: str, controls: list[ControlSpec], tasks: Iterable[dict]) -> int:
        """Add the latest usable annotation of every task; returns how many entries changed.

        A task whose image cannot be read is skipped with a warning, so one broken URL
        does not keep the rest of the project out of the bank.
        """
        changed = 0
        for task in tasks:
            usable = [a for a in task.get("annotations") or [] if not a.get("was_cancelled") and a.get("result")]
            if not usable:
                continue
            latest = max(usable, key=lambda a: _timestamp(a.get("updated_at")))
            try:
                changed += self.add_annotation(project, task, latest, controls) is not None
            except (MediaError, ValueError) as exc:
                log.warning("backfill: task %s of project %s skipped: %s", task.get("id"), project, exc)
        return changed

    def backfill_once(self, project: str, controls: list[ControlSpec],
                      fetch_tasks: Callable[[], Iterable[dict]], *, retry: bool = False) -> bool:
        """Backfill a project the first time it is seen (or, with ``retry``, again), one replica at a time.

        Returns True when this call did the backfill. The claim is held only while it runs:
        a failed backfill is retried by whoever asks next (callers space out their retries),
        so a restart with corrected settings reads the annotations at once.
        """
        if (self.store.is_backfilled(project) and not retry) or not self.store.claim_backfill(project):
            return False
        try:
            changed = self.backfill(project, controls, fetch_tasks())
            self.store.mark_backfilled(project)
        finally:
            self.store.release_backfill(project)
        log.info("backfill: project %s, %d prompt entries added", project, changed)
        return True


def problem_key(annotation_id: int) -> str:
    """The key under which an unusable annotation's reason is recorded."""
    return f"annotation:{int(annotation_id)}"


def _task_id(task: dict) -> int | None:
    try:
        return int(task["id"])
    except (KeyError, TypeError, ValueError):
        return None


def entry_prompt(entry: PromptEntry, control: ControlSpec) -> Prompt:
    """The (image, label map) prompt that ``entry`` holds for ``control``."""
    return _decode_image(entry.images[control.value_key]), _decode_map(entry.label_maps[control.name])


def encode_embedding(vector: np.ndarray) -> str:
    """float32 bytes as base64: entry metadata is JSON."""
    return base64.b64encode(np.asarray(vector, np.float32).tobytes()).decode()


def decode_embedding(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), np.float32)


def _task_url(task: dict, key: str) -> str:
    url = (task.get("data") or {}).get(key)
    if not isinstance(url, str) or not url:
        raise ValueError(f"task {task.get('id')} has no image URL in data[{key!r}]")
    return url


def _timestamp(value: object) -> float:
    """Epoch seconds of an ISO timestamp from Label Studio; now when absent or unreadable."""
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def _working_size(width: int, height: int, limit: int) -> tuple[int, int]:
    scale = min(1.0, limit / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize_nearest(label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize in numpy: label ids must never be blended."""
    width, height = size
    rows = (np.arange(height) * label_map.shape[0] // height).clip(0, label_map.shape[0] - 1)
    cols = (np.arange(width) * label_map.shape[1] // width).clip(0, label_map.shape[1] - 1)
    return label_map[rows][:, cols]


def _encode_image(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _encode_map(label_map: np.ndarray) -> bytes:
    """8-bit PNG: lossless and compact; label ids stay below MAX_LABELS (32)."""
    buf = io.BytesIO()
    Image.fromarray(label_map.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decode_map(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image).astype(np.int32)
