"""SegGPTBackend: setup/predict/fit with a tiny random-weight SegGPT, real Redis and real HTTP."""
from __future__ import annotations

import re
from dataclasses import replace
import time

import numpy as np
import pytest

from backend.label_config import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.jobs import RUNNERS
from backend.model import NO_CLIENT, NO_PROMPTS, LabelConfigError, SegGPTBackend
from backend.results import label_map_to_results
from backend.settings import Settings
from backend.store import PromptStore
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model
from tests.backend.local_http import LEGACY_KEY, FakeLabelStudio, server  # noqa: F401  (fixture)

VERSION_RE = re.compile(r"^seggpt-[0-9a-f]{8}-v(\d+)$")


@pytest.fixture(scope="module")
def predictor() -> SegGPTPredictor:
    return SegGPTPredictor(random_model(), device="cpu")


@pytest.fixture
def settings(tmp_path, image_server) -> Settings:
    return Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,),
                    num_prompts=2, min_region_area=1)


@pytest.fixture
def backend(settings, store, predictor) -> SegGPTBackend:
    return SegGPTBackend(settings, store, predictor=predictor)


def created(ann_id: int, task: dict, label_map: np.ndarray, config: str, at: str = "2026-11-24T20:00:00Z",
            project: int = 1) -> dict:
    """An ANNOTATION_CREATED webhook payload (without "action") as Label Studio sends it."""
    control = parse_label_config(config)[0]
    annotation = {"id": ann_id, "task": task["id"], "was_cancelled": False, "updated_at": at,
                  "result": label_map_to_results(label_map, None, control, min_area=1)}
    return {"annotation": annotation, "task": task, "project": {"id": project, "label_config": config}}


def annotate(backend: SegGPTBackend, image_server, config: str, n: int = 3) -> None:
    for i in range(1, n + 1):
        url, label_map = image_server.add_scene(f"prompt{i}.png", box=(4 * i, 6, 30 + 2 * i, 40), seed=i)
        stamp = f"2026-11-24T20:00:0{i}Z"
        assert backend.fit("ANNOTATION_CREATED", created(100 + i, {"id": i, "data": {"image": url}}, label_map,
                                                         config, stamp))["status"] == "updated"


def without_ids(prediction: dict) -> dict:
    return {**prediction, "result": [{k: v for k, v in r.items() if k != "id"} for r in prediction["result"]]}


def test_setup_answers_without_loading_weights_and_matches_predict(settings, store, image_server, brush_config,
                                                                   tiny_checkpoint) -> None:
    lazy = SegGPTBackend(replace(settings, seggpt_weights=str(tiny_checkpoint)), store)
    first = lazy.setup("1.1795551004", brush_config)
    assert VERSION_RE.match(first).group(1) == "0"
    assert not lazy.model_loaded

    annotate(lazy, image_server, brush_config, n=1)
    current = lazy.setup("1.1795551004", brush_config)
    assert current != first and VERSION_RE.match(current).group(1) == "1"
    assert not lazy.model_loaded  # annotations alone do not load the model either

    url, _ = image_server.add_scene("query.png", seed=9)
    [prediction] = lazy.predict([{"id": 7, "data": {"image": url}}], project="1.1795551004",
                                label_config=brush_config)
    assert lazy.model_loaded
    assert prediction["model_version"] == current == lazy.setup("1", brush_config)
    # another replica with the same checkpoint reports the same version before loading anything
    replica = SegGPTBackend(replace(settings, seggpt_weights=str(tiny_checkpoint)),
                            PromptStore(store.redis))
    assert replica.setup("1.1795551004", brush_config) == current and not replica.model_loaded


def test_setup_rejects_an_unservable_config(backend) -> None:
    with pytest.raises(LabelConfigError, match="no BrushLabels"):
        backend.setup("1", '<View><Image name="i" value="$i"/><Choices name="c" toName="i">'
                           '<Choice value="a"/></Choices></View>')
    with pytest.raises(ValueError, match="project id"):
        backend.setup("abc", "<View/>")


def test_before_any_annotation_every_task_gets_an_empty_prediction_with_a_reason(
        settings, store, image_server, brush_config, tiny_checkpoint) -> None:
    lazy = SegGPTBackend(replace(settings, seggpt_weights=str(tiny_checkpoint)), store)
    tasks = [{"id": i, "data": {"image": image_server.url("whatever.png")}} for i in range(3)]
    predictions = lazy.predict(tasks, project="1.5", label_config=brush_config)
    # no "result": Label Studio skips such entries instead of storing empty predictions
    assert predictions == [{"score": 0.0, "model_version": lazy.model_version("1"),
                            "reason": NO_PROMPTS + NO_CLIENT}] * 3
    assert not lazy.model_loaded


def test_batch_prediction_is_one_entry_per_task_in_order(backend, image_server, brush_config, predictor) -> None:
    annotate(backend, image_server, brush_config, n=3)
    sizes = [(64, 48), (80, 40), (40, 56)]
    tasks = []
    for i, size in enumerate(sizes):
        url, _ = image_server.add_scene(f"q{i}.png", size=size, box=(5, 5, 25, 25), seed=20 + i)
        tasks.append({"id": 10 + i, "data": {"image": url}})
    predictions = backend.predict(tasks, project="1.1795551004", label_config=brush_config)

    assert len(predictions) == 3
    assert any(p["result"] for p in predictions)  # the random model does paint regions
    control = parse_label_config(brush_config)[0]
    for prediction, task, size in zip(predictions, tasks, sizes):
        query = backend.bank.media.load_image(task["data"]["image"])
        [prompts] = backend.selector.select("1", [control], 1, lambda i, key: query).prompts  # the 2 most similar
        assert len(prompts["tag"]) == 2  # NUM_PROMPTS=2 of the 3 annotated tasks
        direct = predictor.predict(query, prompts["tag"], num_labels=2)
        expected = label_map_to_results(direct.label_map, direct.scores, control, min_area=1)
        assert without_ids(prediction)["result"] == without_ids({"result": expected})["result"]
        assert all((r["original_width"], r["original_height"]) == size for r in prediction["result"])
        assert prediction["model_version"] == backend.model_version("1") and "reason" not in prediction
        assert 0.0 <= prediction["score"] <= 1.0


def test_an_unreadable_image_empties_only_its_task(backend, image_server, brush_config) -> None:
    annotate(backend, image_server, brush_config, n=1)
    good, _ = image_server.add_scene("good.png", seed=5)
    (image_server.root / "broken.png").write_bytes(b"not an image at all")
    tasks = [{"id": 11, "data": {"image": good}}, {"id": 12, "data": {"image": image_server.url("missing.png")}},
             {"id": 13, "data": {"image": image_server.url("broken.png")}}, {"id": 14, "data": {"text": "x"}},
             {"id": 15, "data": {"image": good}}]
    predictions = backend.predict(tasks, project="1", label_config=brush_config)
    assert len(predictions) == 5
    assert [bool(p.get("result")) for p in predictions] == [True, False, False, False, True]
    assert not any("result" in p for p in predictions[1:4])  # nothing for Label Studio to store
    assert "HTTP 404" in predictions[1]["reason"]
    assert "not an image" in predictions[2]["reason"]
    assert "no image URL" in predictions[3]["reason"]
    assert "reason" not in predictions[0] and without_ids(predictions[0]) == without_ids(predictions[4])


def test_interactive_context_gets_the_tasks_normal_prediction(backend, image_server, brush_config) -> None:
    annotate(backend, image_server, brush_config, n=2)
    url, _ = image_server.add_scene("q.png", seed=3)
    task = {"id": 9, "data": {"image": url}}
    context = {"result": [{"from_name": "tag", "to_name": "image", "type": "keypointlabels",
                           "value": {"x": 50, "y": 50, "keypointlabels": ["Cat"]}, "is_positive": True}]}
    [interactive] = backend.predict([task], context, project="1", label_config=brush_config)
    [batch] = backend.predict([task], project="1", label_config=brush_config)
    assert interactive["result"] and without_ids(interactive) == without_ids(batch)


def test_webhook_events_update_the_bank_and_the_version(backend, image_server, brush_config) -> None:
    url, label_map = image_server.add_scene("a.png")
    task = {"id": 1, "data": {"image": url}}
    v0 = backend.model_version("1")
    assert backend.fit("ANNOTATION_CREATED", created(11, task, label_map, brush_config))["status"] == "updated"
    v1 = backend.model_version("1")
    assert v1 != v0
    replay = backend.fit("ANNOTATION_UPDATED", created(11, task, label_map, brush_config))
    assert replay == {"status": "unchanged", "model_version": v1}
    newer = created(11, task, label_map * 2, brush_config, at="2026-11-25T00:00:00Z")
    assert backend.fit("ANNOTATION_UPDATED", newer)["model_version"] not in (v0, v1)
    assert backend.store.version("1") == 2

    deleted = backend.fit("ANNOTATIONS_DELETED", {"annotations": [{"id": 11}], "project": {"id": 1}})
    assert deleted["status"] == "updated" and backend.store.entry_count("1") == 0
    query, _ = image_server.add_scene("q.png")
    [prediction] = backend.predict([{"id": 2, "data": {"image": query}}], project="1", label_config=brush_config)
    assert prediction["reason"] == NO_PROMPTS + NO_CLIENT and prediction["model_version"] == deleted["model_version"]


def test_start_training_records_a_tune_job_that_fails_visibly_without_tuning(backend, monkeypatch) -> None:
    monkeypatch.setitem(RUNNERS, "tune", "backend.no_such_tuning_module:run_tune")  # no tuning job installed
    answer = backend.fit("START_TRAINING", {"project": {"id": 3, "title": "p"}})
    assert answer["status"] == "failed" and answer["message"].startswith("tuning not available")
    [job] = backend.jobs.jobs("3")
    assert job["id"] == answer["job"] and job["status"] == "failed" and job["kind"] == "tune"


def test_other_events_are_acknowledged_without_changes(backend, image_server, brush_config) -> None:
    assert backend.fit("PROJECT_UPDATED", {"project": {"id": 1}})["status"] == "ignored"
    url, label_map = image_server.add_scene("a.png")
    no_config = created(1, {"id": 1, "data": {"image": url}}, label_map, brush_config)
    del no_config["project"]["label_config"]
    assert backend.fit("ANNOTATION_CREATED", no_config)["status"] == "ignored"
    assert backend.store.version("1") == 0


def test_first_sight_of_a_project_backfills_from_label_studio(settings, store, predictor, image_server,
                                                              brush_config, server) -> None:  # noqa: F811
    url, label_map = image_server.add_scene("done.png")
    control = parse_label_config(brush_config)[0]
    annotation = {"id": 5, "result": label_map_to_results(label_map, None, control, min_area=1),
                  "was_cancelled": False, "updated_at": "2026-11-24T20:00:00Z"}
    FakeLabelStudio(server, tasks=[{"id": 1, "data": {"image": url}, "annotations": [annotation]},
                                   {"id": 2, "data": {"image": url}, "annotations": []}])
    ls_settings = replace(settings, label_studio_url=server.url,
                          label_studio_api_key=LEGACY_KEY)
    backend = SegGPTBackend(ls_settings, store, client=LabelStudioClient(server.url, LEGACY_KEY),
                            predictor=predictor)
    backend.setup("1.1795551004", brush_config)
    deadline = time.monotonic() + 60
    while not store.is_backfilled("1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.is_backfilled("1") and store.entry("1", 1).annotation_id == 5
    assert VERSION_RE.match(backend.setup("1", brush_config)).group(1) == "1"
    [prediction] = backend.predict([{"id": 2, "data": {"image": url}}], project="1", label_config=brush_config)
    assert prediction["result"]
    assert len(server.hits("/api/tasks/")) == 1  # later calls do not backfill again


def test_an_annotated_task_is_prompted_by_the_others_not_itself(backend, image_server, brush_config) -> None:
    annotate(backend, image_server, brush_config, n=3)  # tasks 1..3
    controls = parse_label_config(brush_config)
    choice = backend.selector.select("1", controls, 2, lambda i, k: None, [2, 99])
    k = backend.settings.num_prompts
    assert k == 2 and sorted(choice.picked[0]["tag"]) == [1, 3]  # task 2 itself is left out
    assert choice.picked[1]["tag"] == [3, 2]  # any other query: the newest k
