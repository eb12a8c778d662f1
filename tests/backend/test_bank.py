"""PromptBank: annotations (real LS result JSON) -> stored prompts, over real Redis and HTTP."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from backend.bank import PromptBank
from backend.label_config import parse_label_config
from backend.media import MediaError, MediaFetcher
from backend.results import label_map_to_results
from backend.settings import Settings
from backend.store import PromptStore


@pytest.fixture
def bank(store: PromptStore, image_server, tmp_path) -> PromptBank:
    settings = Settings(model_dir=tmp_path, allowed_media_hosts=(image_server.host,))
    return PromptBank(store, MediaFetcher(settings), working_size=32)


def annotation(ann_id: int, task_id: int, label_map: np.ndarray, control, at: str = "2026-11-24T20:00:00Z",
               **extra) -> dict:
    """An annotation as Label Studio sends it, its regions made by the production encoder."""
    result = label_map_to_results(label_map, None, control, min_area=1)
    return {"id": ann_id, "task": task_id, "result": result, "was_cancelled": False, "updated_at": at, **extra}


def test_annotation_becomes_a_prompt_at_working_size(bank: PromptBank, image_server, brush_config) -> None:
    control = parse_label_config(brush_config)[0]
    url, label_map = image_server.add_scene("a.png", size=(64, 48))
    task = {"id": 1, "data": {"image": url}}
    assert bank.add_annotation("1", task, annotation(10, 1, label_map, control), [control]) == 1

    version, prompts = bank.prompts("1", [control], k=4)
    assert version == 1
    [(image, stored_map)] = prompts["tag"]
    assert image.size == (32, 24) and image.mode == "RGB"
    np.testing.assert_array_equal(stored_map, label_map[::2, ::2])  # nearest, ids kept
    assert bank.store.entry("1", 1).meta["original_sizes"] == {"image": [64, 48]}


def test_prompts_are_newest_first_and_limited(bank: PromptBank, image_server, brush_config) -> None:
    control = parse_label_config(brush_config)[0]
    for n, stamp in [(1, "2026-01-01T00:00:00Z"), (2, "2026-03-01T00:00:00Z"), (3, "2026-02-01T00:00:00Z")]:
        url, label_map = image_server.add_scene(f"{n}.png", box=(n, n, 20 + n, 20 + n), seed=n)
        bank.add_annotation("1", {"id": n, "data": {"image": url}}, annotation(n * 10, n, label_map, control, stamp),
                            [control])
    version, prompts = bank.prompts("1", [control], k=2)
    assert version == 3
    corners = [np.argwhere(m)[0].tolist() for _, m in prompts["tag"]]
    assert corners == [[1, 1], [2, 2]]  # tasks 2 then 3 (2*n//2 = n at half size)


def test_skipped_emptied_or_foreign_annotations_are_not_prompts(bank: PromptBank, image_server,
                                                                 brush_config) -> None:
    control = parse_label_config(brush_config)[0]
    url, label_map = image_server.add_scene("a.png")
    task = {"id": 1, "data": {"image": url}}
    assert bank.add_annotation("1", task, annotation(10, 1, label_map, control, was_cancelled=True),
                               [control]) is None
    keypoint = {"from_name": "kp", "type": "keypointlabels", "value": {"x": 5, "y": 5, "keypointlabels": ["Cat"]}}
    assert bank.add_annotation("1", task, {"id": 11, "result": [keypoint]}, [control]) is None
    assert bank.store.entry_count("1") == 0

    assert bank.add_annotation("1", task, annotation(10, 1, label_map, control), [control]) == 1
    # the annotator later skips the task: the prompt it made disappears
    skipped = annotation(10, 1, label_map, control, at="2026-12-01T00:00:00Z", was_cancelled=True)
    assert bank.add_annotation("1", task, skipped, [control]) == 2
    assert bank.prompts("1", [control], k=4)[1]["tag"] == []


def test_update_replaces_and_delete_removes(bank: PromptBank, image_server, brush_config) -> None:
    control = parse_label_config(brush_config)[0]
    url, label_map = image_server.add_scene("a.png")
    task = {"id": 5, "data": {"image": url}}
    bank.add_annotation("1", task, annotation(50, 5, label_map, control, "2026-01-01T00:00:00Z"), [control])
    relabelled = label_map * 2  # the same region, now "Dog"
    assert bank.add_annotation("1", task, annotation(50, 5, relabelled, control, "2026-01-02T00:00:00Z"),
                               [control]) == 2
    [(_, stored)] = bank.prompts("1", [control], k=4)[1]["tag"]
    assert set(np.unique(stored)) == {0, 2}
    assert bank.remove_annotations("1", [50]) == 3
    assert bank.prompts("1", [control], k=4) == (3, {"tag": []})


def test_every_control_gets_its_own_label_map(bank: PromptBank, image_server, brush_and_poly_config) -> None:
    brush, poly = parse_label_config(brush_and_poly_config)
    url, label_map = image_server.add_scene("a.png")
    both = annotation(1, 1, label_map, brush)
    both["result"] += label_map_to_results(label_map, None, poly, min_area=1)
    bank.add_annotation("1", {"id": 1, "data": {"image": url}}, both, [brush, poly])
    url2, label_map2 = image_server.add_scene("b.png", box=(30, 10, 50, 40))
    bank.add_annotation("1", {"id": 2, "data": {"image": url2}}, annotation(2, 2, label_map2, brush), [brush, poly])
    _, prompts = bank.prompts("1", [brush, poly], k=4)
    assert len(prompts["tag"]) == 2 and len(prompts["poly"]) == 1
    assert bank.remove_tasks("1", [1]) == 3
    _, prompts = bank.prompts("1", [brush, poly], k=4)
    assert len(prompts["tag"]) == 1 and prompts["poly"] == []


def test_unreadable_image_leaves_the_bank_unchanged(bank: PromptBank, image_server, brush_config) -> None:
    control = parse_label_config(brush_config)[0]
    _, label_map = image_server.add_scene("a.png")
    with pytest.raises(MediaError, match="HTTP 404"):
        bank.add_annotation("1", {"id": 1, "data": {"image": image_server.url("missing.png")}},
                            annotation(1, 1, label_map, control), [control])
    with pytest.raises(ValueError, match="no image URL"):
        bank.add_annotation("1", {"id": 1, "data": {}}, annotation(1, 1, label_map, control), [control])
    assert bank.store.version("1") == 0


def test_backfill_takes_each_tasks_latest_usable_annotation(bank: PromptBank, image_server, brush_config,
                                                           caplog) -> None:
    control = parse_label_config(brush_config)[0]
    url, label_map = image_server.add_scene("a.png")
    old = annotation(1, 1, label_map * 2, control, "2026-01-01T00:00:00Z")
    new = annotation(2, 1, label_map, control, "2026-02-01T00:00:00Z")
    skipped = annotation(3, 2, label_map, control, "2026-03-01T00:00:00Z", was_cancelled=True)
    tasks = [
        {"id": 1, "data": {"image": url}, "annotations": [new, old]},
        {"id": 2, "data": {"image": url}, "annotations": [skipped]},
        {"id": 3, "data": {"image": image_server.url("gone.png")},
         "annotations": [annotation(4, 3, label_map, control)]},
    ]
    with caplog.at_level(logging.WARNING):
        assert bank.backfill_once("1", [control], lambda: tasks) is True
    assert "task 3" in caplog.text
    assert bank.store.is_backfilled("1")
    assert [e.annotation_id for e in bank.store.snapshot("1", ["tag"], 4)[1]["tag"]] == [2]
    # seen once: later calls neither fetch tasks nor change anything
    assert bank.backfill_once("1", [control], lambda: pytest.fail("fetched twice")) is False
