"""Prompt packs: export/import round trip, and every damaged or foreign pack refused before
anything is written (real Redis, real images, a tiny random-weight SegGPT)."""
from __future__ import annotations

import io
import json
import zipfile
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from backend.model import SegGPTBackend
from backend.packs import ModelIdentity, export_pack, import_pack, read_pack
from backend.settings import Settings
from backend.store import PromptEntry, PromptStore
from seggpt_model import SegGPTConfig, SegGPTPredictor
from seggpt_model.testing import random_model
from seggpt_model.tuning import TunedPrompt
from backend.label_config import parse_label_config
from backend.results import label_map_to_results

TINY = ModelIdentity("0123456789ab", SegGPTConfig.tiny().to_dict())  # image_size 64


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def label_map(width: int, height: int, label: int = 1) -> np.ndarray:
    out = np.zeros((height, width), np.uint8)
    out[2:10, 3:12] = label
    return out


def tuned(size: int = 64) -> bytes:
    return TunedPrompt(torch.zeros(3, size, size), torch.ones(3, size, size), 1).to_bytes()


def fill(store: PromptStore, project: str = "1") -> None:
    for task in (1, 2):
        store.put_entry(project, PromptEntry(task, task * 10, 100.0 + task, images={"image": jpeg(40, 30, task)},
                                             label_maps={"tag": png(label_map(40, 30, task))},
                                             meta={"original_sizes": {"image": [80, 60]}}))
    store.update_settings(project, {"prompt_selection": "recent"})
    store.set_tuned_prompt(project, tuned(), {"held_out_miou": 0.61})


def rewrite(pack: bytes, change: Callable[[dict, dict], None]) -> bytes:
    """``pack`` with ``change(members, manifest)`` applied (None as a member's bytes removes it)."""
    with zipfile.ZipFile(io.BytesIO(pack)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    change(members, manifest)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            if data is not None:
                zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def pack(store: PromptStore) -> bytes:
    fill(store, "1")
    return export_pack(store, "1", TINY)[0]


def test_pack_holds_the_state_and_says_what_it_was_made_for(store: PromptStore, pack: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(pack)) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        names = set(zf.namelist())
    assert manifest["format"] == 1 and manifest["source_project"] == "1" and manifest["version"] == 4
    assert manifest["model"] == {"fingerprint": TINY.fingerprint, "config": SegGPTConfig.tiny().to_dict()}
    assert manifest["model_version"] == "seggpt-01234567-v4" and manifest["created_at"].endswith("Z")
    assert manifest["settings"] == {"prompt_selection": "recent"}
    assert manifest["tuned"] == {"file": "tuned.safetensors", "meta": {"held_out_miou": 0.61}}
    assert [e["task_id"] for e in manifest["entries"]] == [1, 2]
    assert manifest["entries"][0]["images"] == {"image": "entries/1/image-0.jpg"}
    assert names == {"manifest.json", "tuned.safetensors", "entries/1/image-0.jpg", "entries/1/map-0.png",
                     "entries/2/image-0.jpg", "entries/2/map-0.png"}


def test_import_makes_another_project_equal_in_one_version(store: PromptStore, pack: bytes) -> None:
    store.put_entry("2", PromptEntry(9, 90, 1.0, {"image": jpeg(8, 8)}, {"tag": png(label_map(8, 8) * 0 + 1)}))
    result = import_pack(store, "2", pack, TINY)
    assert result == {"version": 2, "model_version": "seggpt-01234567-v2", "entries": 2, "tuned": True,
                      "warnings": []}
    assert store.entries("2")[1] == store.entries("1")[1]  # the other project's entry 9 is replaced
    assert store.tuned_prompt("2") == store.tuned_prompt("1") and store.settings("2") == store.settings("1")
    assert store.history("2")[0]["change"] == "pack import (project 1 v4, 2 entries)"
    # a pack of the imported project is the same pack, but for its source and version
    again = read_pack(export_pack(store, "2", TINY)[0], TINY)
    assert [e for e in again.entries] == store.entries("1")[1]


def test_other_weights_of_the_same_shape_import_with_a_warning(store: PromptStore, pack: bytes) -> None:
    result = import_pack(store, "2", pack, ModelIdentity("ffffffffffff", TINY.config))
    assert result["version"] == 1 and "other weights" in result["warnings"][0]


def _entry0(manifest: dict) -> dict:
    return manifest["entries"][0]


BAD_PACKS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("truncated", lambda p: p[: len(p) // 2], "not a zip archive, or it is truncated"),
    ("not a zip", lambda p: b"PK\x03\x04 hello", "not a zip archive"),
    ("no manifest", lambda p: _drop_manifest(p), "manifest.json is missing"),
    ("manifest not JSON", lambda p: _with_raw_manifest(p, b"{nope"), "manifest.json is not valid JSON"),
    ("future format", lambda p: rewrite(p, lambda m, man: man.update(format=2)), "unsupported pack format 2"),
    ("other shape", lambda p: rewrite(p, lambda m, man: man["model"]["config"].update(embed_dim=128)),
     "another shape (embed_dim: pack 128, here 64)"),
    ("no model", lambda p: rewrite(p, lambda m, man: man.pop("model")), "which model the pack was made for"),
    ("missing image file", lambda p: rewrite(p, lambda m, man: m.update({"entries/1/image-0.jpg": None})),
     "entry 0 (task 1): images names entries/1/image-0.jpg, which the pack lacks"),
    ("image does not decode", lambda p: rewrite(p, lambda m, man: m.update({"entries/2/image-0.jpg": b"\xff\xd8junk"})),
     "entry 1 (task 2): image 'image' does not decode"),
    ("label map not a PNG", lambda p: rewrite(p, lambda m, man: m.update({"entries/1/map-0.png": b"GIF89a"})),
     "entry 0 (task 1): label map 'tag' is not a PNG"),
    ("label map truncated", lambda p: rewrite(p, lambda m, man: m.update(
        {"entries/1/map-0.png": png(label_map(40, 30))[:60]})), "label map 'tag' does not decode"),
    ("label map of another size", lambda p: rewrite(p, lambda m, man: m.update(
        {"entries/1/map-0.png": png(label_map(20, 15))})), "label map 'tag' is 20x15, its image is 40x30"),
    ("label beyond the palette", lambda p: rewrite(p, lambda m, man: m.update(
        {"entries/2/map-0.png": png(label_map(40, 30, label=40))})), "uses label 40, beyond the 32 labels"),
    ("colour label map", lambda p: rewrite(p, lambda m, man: m.update(
        {"entries/1/map-0.png": png(np.zeros((30, 40, 3), np.uint8))})), "mode RGB"),
    ("empty label map", lambda p: rewrite(p, lambda m, man: m.update(
        {"entries/1/map-0.png": png(np.zeros((30, 40), np.uint8))})), "holds no labelled pixel"),
    ("task twice", lambda p: rewrite(p, lambda m, man: man["entries"][1].update(task_id=1)),
     "entry 1: task 1 appears twice"),
    ("bad task id", lambda p: rewrite(p, lambda m, man: _entry0(man).update(task_id="1")),
     "entry 0: task_id must be an integer"),
    ("bad settings", lambda p: rewrite(p, lambda m, man: man.update(settings={"prompt_selection": "all"})),
     "manifest.json settings: prompt_selection must be one of"),
    ("tuned of the wrong shape", lambda p: rewrite(p, lambda m, man: m.update({"tuned.safetensors": tuned(32)})),
     "tuned.safetensors: tuned prompt tensors must be (3, 64, 64), got image (3, 32, 32)"),
    ("tuned not safetensors", lambda p: rewrite(p, lambda m, man: m.update({"tuned.safetensors": b"\x00" * 20})),
     "tuned.safetensors: not a tuned prompt"),
    ("tuned missing", lambda p: rewrite(p, lambda m, man: m.update({"tuned.safetensors": None})),
     "the tuned prompt tuned.safetensors is missing"),
]


def _drop_manifest(pack: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(pack)) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _with_raw_manifest(pack: bytes, raw: bytes) -> bytes:
    buf = io.BytesIO(_drop_manifest(pack))
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("manifest.json", raw)
    return buf.getvalue()


@pytest.mark.parametrize("name, damage, message", BAD_PACKS, ids=[b[0] for b in BAD_PACKS])
def test_a_bad_pack_is_refused_and_nothing_is_written(store: PromptStore, pack: bytes, name, damage,
                                                      message) -> None:
    fill(store, "2")
    before = (store.version("2"), store.entries("2")[1], store.tuned_prompt("2"), store.history("2"))
    with pytest.raises(ValueError) as refused:
        import_pack(store, "2", damage(pack), TINY)
    assert message in str(refused.value)
    assert (store.version("2"), store.entries("2")[1], store.tuned_prompt("2"), store.history("2")) == before


def test_a_corrupted_member_fails_its_checksum(store: PromptStore, pack: bytes) -> None:
    stored = bytearray(pack)
    at = stored.index(jpeg(40, 30, 1)[200:240])  # image members are stored uncompressed
    stored[at:at + 8] = b"XXXXXXXX"
    with pytest.raises(ValueError, match="pack file entries/1/image-0.jpg is damaged: Bad CRC-32"):
        read_pack(bytes(stored), TINY)


def test_zip_bombs_are_bounded(pack: bytes) -> None:
    bomb = rewrite(pack, lambda m, man: m.update({"padding.bin": bytes(5 << 20)}))
    assert len(bomb) < 100_000  # 5 MiB of zeros compress to a few kB
    with pytest.raises(ValueError, match=r"unpacks to \d+ bytes; at most 1048576"):
        read_pack(bomb, TINY, max_bytes=1 << 20)
    many = rewrite(pack, lambda m, man: m.update({f"x/{i}": b"" for i in range(50)}))
    with pytest.raises(ValueError, match="the pack has 56 files; at most 20"):
        read_pack(many, TINY, max_members=20)
    assert len(read_pack(pack, TINY).entries) == 2  # the real pack is well within the defaults


def annotate(backend: SegGPTBackend, image_server, config: str, n: int) -> None:
    """ANNOTATION_CREATED webhooks as Label Studio sends them, for ``n`` tasks."""
    control = parse_label_config(config)[0]
    for i in range(1, n + 1):
        url, labels = image_server.add_scene(f"prompt{i}.png", box=(4 * i, 6, 30 + 2 * i, 40), seed=i)
        annotation = {"id": 100 + i, "task": i, "was_cancelled": False, "updated_at": f"2026-11-24T20:00:0{i}Z",
                      "result": label_map_to_results(labels, None, control, min_area=1)}
        assert backend.fit("ANNOTATION_CREATED", {"annotation": annotation, "task": {"id": i, "data": {"image": url}},
                                                  "project": {"id": 1, "label_config": config}})["status"] == "updated"


def without_ids(prediction: dict) -> dict:
    return {**prediction, "result": [{k: v for k, v in r.items() if k != "id"} for r in prediction["result"]]}


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(member=st.sampled_from(["entries/1/image-0.jpg", "entries/1/map-0.png", "tuned.safetensors", "manifest.json"]),
       at=st.floats(0, 1), junk=st.binary(min_size=1, max_size=16), cut=st.booleans())
def test_damaged_members_are_a_value_error_or_harmless(pack: bytes, member: str, at: float, junk: bytes,
                                                       cut: bool) -> None:
    """Whatever the bytes of a member, reading the pack answers a pack or a ValueError, never a crash."""
    with zipfile.ZipFile(io.BytesIO(pack)) as zf:
        data = zf.read(member)
    i = int(at * (len(data) - 1))
    damaged = data[:i] + junk if cut else data[:i] + junk + data[i + len(junk):]
    repacked = rewrite(pack, lambda m, man: m.update({member: damaged})) if member != "manifest.json" else \
        _with_raw_manifest(pack, damaged)
    try:
        read_pack(repacked, TINY)
    except ValueError:
        pass


@pytest.fixture(scope="module")
def predictor() -> SegGPTPredictor:
    return SegGPTPredictor(random_model(), device="cpu")


def test_imported_project_predicts_exactly_like_its_source(store, predictor, image_server, tmp_path,
                                                           brush_config) -> None:
    settings = Settings(model_dir=tmp_path, device="cpu", allowed_media_hosts=(image_server.host,),
                        num_prompts=2, min_region_area=1)
    backend = SegGPTBackend(settings, store, predictor=predictor)
    annotate(backend, image_server, brush_config, n=3)
    identity = ModelIdentity(backend.fingerprint, backend.model_config())
    import_pack(store, "5", export_pack(store, "1", identity)[0], identity)
    assert store.entries("5")[1] == store.entries("1")[1]
    url, _ = image_server.add_scene("query.png", seed=11)
    tasks = [{"id": 50, "data": {"image": url}}]
    source = backend.predict(tasks, project="1", label_config=brush_config)[0]
    copied = backend.predict(tasks, project="5", label_config=brush_config)[0]
    assert source["result"] and source["model_version"].endswith("-v3") and copied["model_version"].endswith("-v1")
    assert {**without_ids(copied), "model_version": ""} == {**without_ids(source), "model_version": ""}
