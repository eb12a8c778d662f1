"""Tuning and selection in the service: triggers, the job record and loss curve, promoted versions
served by every replica, prompt settings, the CLI and the report endpoints (real Redis, real HTTP)."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import create_app
from backend.cli import main
from backend.label_config import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.model import SegGPTBackend
from backend.prompting import pack_tuned, unpack_tuned
from backend.results import label_map_to_results
from backend.settings import Settings
from backend.store import PromptStore
from backend.tuning import Example, examples_for, load_data
from seggpt_model import SegGPTPredictor, load_seggpt
from seggpt_model.retrieval import embed_image
from seggpt_model.tuning import PromptTuner, TuningConfig
from tests.backend.local_http import LEGACY_KEY, FakeLabelStudio, Reply, server  # noqa: F401  (fixture)
from tests.backend.conftest import scene
from tests.backend.test_quality import CONFIG as REPORT_CONFIG, project_tasks

PROJECT = "1"


@pytest.fixture
def predictor(tiny_checkpoint) -> SegGPTPredictor:
    """The model the service loads from SEGGPT_WEIGHTS, loaded here too to check its answers."""
    return SegGPTPredictor(load_seggpt(str(tiny_checkpoint)), device="cpu")


@pytest.fixture
def settings(tmp_path, image_server, tiny_checkpoint) -> Settings:
    return Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,), num_prompts=2,
                    min_region_area=1, seggpt_weights=str(tiny_checkpoint), tune_steps=4, tune_batch=2,
                    tune_bf16="false")


@pytest.fixture
def backend(settings, store, predictor) -> SegGPTBackend:
    return SegGPTBackend(settings, store, predictor=predictor)


def created(t: int, url: str, label_map: np.ndarray, config: str) -> dict:
    control = parse_label_config(config)[0]
    annotation = {"id": 1000 + t, "task": t, "was_cancelled": False, "updated_at": f"2026-11-24T20:00:{t:02d}Z",
                  "result": label_map_to_results(label_map, None, control, min_area=1)}
    return {"annotation": annotation, "task": {"id": t, "data": {"image": url}},
            "project": {"id": int(PROJECT), "label_config": config}}


def annotate(backend: SegGPTBackend, image_server, config: str, task_ids) -> list[dict]:
    answers = []
    for t in task_ids:
        url, label_map = image_server.add_scene(f"task{t}.png", box=(4 + t % 9, 6, 28 + t % 9, 36), seed=t)
        answers.append(backend.fit("ANNOTATION_CREATED", created(t, url, label_map, config)))
    return answers


def test_start_training_tunes_in_the_background_and_every_replica_serves_the_promoted_version(
        settings, store, backend, predictor, image_server, brush_config) -> None:
    settings = replace(settings, tune_min_gain=-1.0)  # promote whatever comes out: this is about the plumbing
    backend.settings = settings
    annotate(backend, image_server, brush_config, range(1, 7))
    client = TestClient(create_app(settings, backend))
    before = client.post("/setup", json={"project": "1.17", "schema": brush_config}).json()["model_version"]

    answer = client.post("/webhook", json={"action": "START_TRAINING",
                                           "project": {"id": 1, "label_config": brush_config}})
    assert answer.status_code == 201 and answer.json()["status"] == "queued"  # answered before any tuning
    job_id = answer.json()["job"]
    assert store.version(PROJECT) == 6 and store.tuned_prompt(PROJECT) is None

    updates = []
    record = backend.jobs.run(job_id, settings, hook=updates.append)  # what a worker does
    assert record["status"] == "finished", record
    assert [u["done"] for u in updates if u.get("done") is not None][:4] == [1, 2, 3, 4]
    result = client.get(f"/jobs/{job_id}").json()["result"]
    assert result["decision"] == "promoted" and result["version_after"] == 7
    tag = result["controls"]["tag"]
    assert len(tag["losses"]) == 4 and {"iou_before", "iou_after", "init_task"} <= set(tag)
    assert "held-out mean IoU" in result["reason"] and result["loss_png"] == f"/jobs/{job_id}/loss.png"
    png = client.get(f"/jobs/{job_id}/loss.png")
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size[0] == 720  # the height grows with the legend
    assert client.get("/jobs/tune-999/loss.png").status_code == 404

    after = client.post("/setup", json={"project": "1.17", "schema": brush_config}).json()["model_version"]
    assert after != before and after.endswith("-v7")
    replica = SegGPTBackend(settings, PromptStore(store.redis), predictor=predictor)  # another process's view
    assert replica.setup("1.17", brush_config) == after
    query, _ = image_server.add_scene("query.png", seed=50)
    task = {"id": 50, "data": {"image": query}}
    [mine] = backend.predict([task], project="1", label_config=brush_config)
    [theirs] = replica.predict([task], project="1", label_config=brush_config)
    assert mine["model_version"] == theirs["model_version"] == after
    strip = lambda p: [{k: v for k, v in r.items() if k != "id"} for r in p["result"]]  # noqa: E731
    assert strip(mine) == strip(theirs)
    # and it is the tuned prompt ensembled with the most similar example (NUM_PROMPTS=2)
    tuned = unpack_tuned(store.tuned_prompt(PROJECT))["tag"]
    image = backend.bank.media.load_image(query)
    [d] = load_data(store, PROJECT, parse_label_config(brush_config))[1]
    bank_examples = {e.task_id: e for e in d.train + d.held_out}
    picked = replica.selector.select(PROJECT, parse_label_config(brush_config), 1, lambda i, k: image).picked[0]["tag"]
    assert len(picked) == 1
    direct = predictor.predict(image, [(bank_examples[picked[0]].image, bank_examples[picked[0]].label_map)],
                               num_labels=2, tuned=tuned)
    expected = label_map_to_results(direct.label_map, direct.scores, parse_label_config(brush_config)[0], min_area=1)
    assert strip(mine) == strip({"result": expected})


def test_a_tune_job_stopped_mid_run_promotes_nothing(settings, store, backend, image_server, brush_config) -> None:
    backend.settings = settings = replace(settings, tune_min_gain=-1.0)  # it would be promoted if it finished
    annotate(backend, image_server, brush_config, range(1, 6))
    version = store.version(PROJECT)
    job = backend.fit("START_TRAINING", {"project": {"id": 1, "label_config": brush_config}})

    def stop_at_step_two(record: dict) -> None:
        if record.get("done") == 2:
            backend.jobs.fail(job["job"], "stopped by an operator")

    assert backend.jobs.run(job["job"], settings, hook=stop_at_step_two) is None  # it noticed at its next step
    record = backend.jobs.get(job["job"])
    assert record["status"] == "failed" and record["reason"] == "stopped by an operator" and record["done"] == 2
    assert store.version(PROJECT) == version and store.tuned_prompt(PROJECT) is None


def test_tuned_prompt_alone_or_ensembled_per_project_setting(settings, store, backend, predictor, image_server,
                                                             brush_config) -> None:
    annotate(backend, image_server, brush_config, range(1, 4))
    controls = parse_label_config(brush_config)
    [d] = load_data(store, PROJECT, controls)[1]
    tuned = unpack_tuned(pack_tuned({"tag": _some_prompt(predictor)}))["tag"]
    store.set_tuned_prompt(PROJECT, pack_tuned({"tag": tuned}), {"job": "test"})
    client = TestClient(create_app(settings, backend))
    query, _ = image_server.add_scene("query.png", seed=60)
    image = backend.bank.media.load_image(query)
    control = controls[0]

    def served() -> list[dict]:
        body = {"tasks": [{"id": 60, "data": {"image": query}}], "project": "1.17", "label_config": brush_config}
        return [{k: v for k, v in r.items() if k != "id"} for r in client.post("/predict", json=body).json()[
            "results"][0]["result"]]

    def expected(prompts) -> list[dict]:
        out = predictor.predict(image, prompts, num_labels=2, tuned=tuned)
        return [{k: v for k, v in r.items() if k != "id"}
                for r in label_map_to_results(out.label_map, out.scores, control, min_area=1)]

    query_example = Example(0, image, np.zeros((1, 1)), embed_image(image))
    assert client.get("/projects/1/settings").json()["settings"] == {"prompt_selection": "similar",
                                                                     "tuned_prompt": "ensemble", "tiling": "auto"}
    assert served() == expected(examples_for(query_example, d.train + d.held_out, 1, "similar"))
    version = store.version(PROJECT)
    changed = client.put("/projects/1/settings", json={"tuned_prompt": "alone"}).json()
    assert changed["changed"] and changed["settings"]["tuned_prompt"] == "alone" and changed["version"] == version + 1
    assert changed["own"] == {"tuned_prompt": "alone"} and changed["model_version"].endswith(f"-v{version + 1}")
    assert served() == expected([])
    assert client.put("/projects/1/settings", json={"tuned_prompt": None}).json()["own"] == {}


def _some_prompt(predictor):
    examples = [scene(seed=s) for s in (1, 2)]
    return PromptTuner(predictor.model, TuningConfig(steps=1, batch_size=1)).tune(examples, examples[0]).prompt


@pytest.mark.parametrize("body, detail", [
    ({"tuned_prompt": "sometimes"}, "tuned_prompt must be one of ensemble, alone"),
    ({"prompt_selection": "random"}, "prompt_selection must be one of similar, recent"),
    ({"k": 3}, "unknown setting 'k'"),
    ([1, 2], "settings must be a JSON object"),
])
def test_bad_settings_are_refused_and_change_nothing(settings, backend, body, detail) -> None:
    client = TestClient(create_app(settings, backend))
    response = client.put("/projects/1/settings", json=body)
    assert response.status_code == 422 and detail in response.json()["detail"]
    assert backend.store.version(PROJECT) == 0


def test_every_n_corrections_queue_one_tune_job_per_project(settings, store, predictor, image_server,
                                                             brush_config) -> None:
    backend = SegGPTBackend(replace(settings, tune_every_n_corrections=3), store, predictor=predictor)
    annotate(backend, image_server, brush_config, [1, 2])
    assert backend.jobs.jobs(PROJECT) == []
    annotate(backend, image_server, brush_config, [3])
    [job] = backend.jobs.jobs(PROJECT)
    assert job["kind"] == "tune" and job["status"] == "queued" and job["params"]["trigger"] == "corrections"
    annotate(backend, image_server, brush_config, [4, 5])  # debounced: the queued job covers them
    assert [j["id"] for j in backend.jobs.jobs(PROJECT)] == [job["id"]]
    assert int(store.redis.get(store.corrections_key(PROJECT))) == 5

    record = backend.jobs.run(job["id"], settings)
    assert record["status"] == "finished" and int(store.redis.get(store.corrections_key(PROJECT))) == 0
    annotate(backend, image_server, brush_config, [6, 7])
    assert len(backend.jobs.jobs(PROJECT)) == 1
    annotate(backend, image_server, brush_config, [8])
    assert len(backend.jobs.jobs(PROJECT)) == 2


def test_tune_command_follows_the_job_and_writes_its_report(settings, store, backend, image_server, brush_config,
                                                            tmp_path, monkeypatch, redis_client, capsys) -> None:
    annotate(backend, image_server, brush_config, range(1, 6))
    config = tmp_path / "config.xml"
    config.write_text(brush_config)
    env = {"REDIS_URL": f"unix://{redis_client.socket_file}", "MODEL_DIR": str(tmp_path), "DEVICE": "cpu",
           "SEGGPT_WEIGHTS": settings.seggpt_weights, "TUNE_STEPS": "3", "TUNE_BATCH": "1", "TUNE_BF16": "false",
           "NUM_PROMPTS": "2", "LOG_LEVEL": "WARNING"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as done:
        main(["tune", "--project", "1", "--inline", "--label-config", str(config), "--out", str(tmp_path / "out")])
    assert done.value.code == 0
    out = capsys.readouterr()
    assert "tune-1: finished: kept:" in out.out or "tune-1: finished: promoted:" in out.out
    assert "tag: held-out mean IoU" in out.out and "3/3" in out.err  # the tqdm bar
    record = json.loads((tmp_path / "out" / "result.json").read_text())
    assert record["result"]["controls"]["tag"]["steps"] == 3
    assert Image.open(tmp_path / "out" / "loss.png").format == "PNG"

    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["tune", "--project", "2", "--inline"])  # no label config anywhere: a clear failure
    assert done.value.code == 1 and "tuning needs the project's label config" in capsys.readouterr().out


def _report_ls(server):  # noqa: F811
    tasks, _ = project_tasks()
    late = {**tasks[0]["predictions"][0], "model_version": "seggpt-abcdef12-v9", "created_at": "2099-01-01T00:00:00Z"}
    tasks[0]["predictions"].append(late)  # made after the annotation: left out of the report
    ls = FakeLabelStudio(server, tasks=tasks)
    server.route("GET", "/api/projects/1/", ls.authed(lambda r: Reply.json({"id": 1, "label_config": REPORT_CONFIG})))
    return ls


def test_report_endpoints_and_command(settings, store, predictor, server, tmp_path, monkeypatch,  # noqa: F811
                                      capsys) -> None:
    _report_ls(server)
    with_ls = SegGPTBackend(settings, store, client=LabelStudioClient(server.url, LEGACY_KEY), predictor=predictor)
    client = TestClient(create_app(settings, with_ls))
    report = client.get("/projects/1/report").json()
    assert [v["model_version"] for v in report["versions"]] == ["seggpt-abcdef12-v1", "seggpt-abcdef12-v2"]
    assert report["versions"][1]["mean_iou"] == 1.0 and report["versions"][0]["accepted_share"] == 0.25
    png = client.get("/projects/1/report.png")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).format == "PNG"
    missing = client.get("/projects/7/report")  # a project Label Studio does not have: its 404, not a 502
    assert missing.status_code == 404 and "/api/projects/7/" in missing.json()["detail"]
    without = TestClient(create_app(settings, SegGPTBackend(settings, store, predictor=predictor)))
    assert without.get("/projects/1/report").status_code == 503

    for name, value in {"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": LEGACY_KEY,
                        "MODEL_DIR": str(tmp_path), "LOG_LEVEL": "WARNING"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as done:
        main(["report", "--project", "1", "--out", str(tmp_path / "rep")])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "seggpt-abcdef12-v2" in printed and "100.0%" in printed
    assert "left out: 1 pre-labels made after their annotation was started" in printed and "v9" not in printed
    assert json.loads((tmp_path / "rep" / "report.json").read_text()) == report
    assert Image.open(tmp_path / "rep" / "report.png").format == "PNG"
