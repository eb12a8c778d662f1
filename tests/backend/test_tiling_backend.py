"""Scale-matched tiling wherever the backend predicts: the TILING deployment setting, the
per-project setting (settings endpoint, prompt packs), and what each prediction reports."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import create_app
from backend.label_config import parse_label_config
from backend.model import SegGPTBackend
from backend.results import label_map_to_results
from backend.settings import Settings
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model

PROJECT = "1.1795551004"
SIDE, OBJECT = 512, 24  # a scene 8 canvases wide (the tiny model paints 64 px) with small squares


def scene(seed: int) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (SIDE, SIDE, 3), dtype=np.uint8)
    labels = np.zeros((SIDE, SIDE), np.int32)
    for y in range(40, SIDE - OBJECT, 120):
        for x in range(40, SIDE - OBJECT, 120):
            pixels[y:y + OBJECT, x:x + OBJECT] = (230, 40, 40)
            labels[y:y + OBJECT, x:x + OBJECT] = 1
    return Image.fromarray(pixels), labels


@pytest.fixture(scope="module")
def predictor() -> SegGPTPredictor:
    return SegGPTPredictor(random_model(), device="cpu")


@pytest.fixture
def served(tmp_path, store, predictor, image_server, brush_config, tiny_checkpoint):
    """A client whose project has one annotated large scene, and a large query URL; ``load=True``
    loads SEGGPT_WEIGHTS as serving does (with its settings) instead of sharing a ready model."""
    def make(load: bool = False, **overrides) -> tuple[TestClient, str]:
        settings = Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,),
                            min_region_area=1, seggpt_weights=str(tiny_checkpoint), **overrides)
        backend = SegGPTBackend(settings, store) if load else SegGPTBackend(settings, store, predictor=predictor)
        client = TestClient(create_app(settings, backend))
        image, labels = scene(0)
        image.save(image_server.root / "prompt.png")
        scene(1)[0].save(image_server.root / "query.png")
        control = parse_label_config(brush_config)[0]
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": brush_config},
                "task": {"id": 1, "data": {"image": image_server.url("prompt.png")}},
                "annotation": {"id": 10, "task": 1, "result": label_map_to_results(labels, None, control, min_area=1)}}
        assert client.post("/webhook", json=body).status_code == 200
        return client, image_server.url("query.png")
    return make


def painted(client: TestClient, config: str, url: str) -> dict:
    body = {"project": PROJECT, "label_config": config, "tasks": [{"id": 2, "data": {"image": url}}]}
    [answer] = client.post("/predict", json=body).json()["results"]
    assert "reason" not in answer, answer
    return answer["tiling"]["tag"]


def test_small_objects_in_a_large_image_are_tiled_and_the_choice_reported(served, brush_config) -> None:
    client, url = served()
    auto = painted(client, brush_config, url)
    assert auto["tiles"] > 1 and auto["scale"] < SIDE, auto
    assert auto["prompt_crops"] >= 1


def test_the_deployment_and_the_project_can_turn_tiling_off(served, brush_config) -> None:
    client, url = served(tiling="off")
    off = painted(client, brush_config, url)
    assert off["tiles"] == 1 and off["reason"] == "off"

    client, url = served()  # auto for the deployment, off for this project
    assert client.put("/projects/1/settings", json={"tiling": "off"}).json()["settings"]["tiling"] == "off"
    assert painted(client, brush_config, url)["tiles"] == 1
    assert client.put("/projects/1/settings", json={"tiling": None}).json()["settings"]["tiling"] == "auto"
    assert painted(client, brush_config, url)["tiles"] > 1
    bad = client.put("/projects/1/settings", json={"tiling": "sometimes"})
    assert bad.status_code == 422 and "tiling must be one of auto, off" in bad.json()["detail"]


def test_max_tiles_caps_the_tiles_per_query(served, brush_config) -> None:
    client, url = served(load=True, max_tiles=2)
    assert painted(client, brush_config, url)["tiles"] <= 2


def test_the_tiling_setting_travels_in_prompt_packs(served) -> None:
    client, _ = served()
    client.put("/projects/1/settings", json={"tiling": "off"})
    pack = client.get("/projects/1/pack").content
    manifest = zipfile.ZipFile(io.BytesIO(pack)).read("manifest.json").decode()
    assert '"tiling": "off"' in manifest
    assert client.post("/projects/2/pack", content=pack).status_code == 200
    assert client.get("/projects/2/settings").json()["settings"]["tiling"] == "off"


def test_tiling_settings_from_the_environment() -> None:
    assert Settings.from_env({}).tiling == "auto" and Settings.from_env({}).max_tiles == 64
    assert Settings.from_env({"TILING": "OFF", "MAX_TILES": "9"}).tiling == "off"
    with pytest.raises(ValueError, match="TILING"):
        Settings.from_env({"TILING": "maybe"})
    with pytest.raises(ValueError, match="MAX_TILES"):
        Settings.from_env({"MAX_TILES": "0"})
