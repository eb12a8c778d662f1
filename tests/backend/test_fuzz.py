"""Property-based fuzzing of every endpoint: malformed requests get a 4xx, never a 5xx, and change nothing.

Hypothesis generates the requests (derandomized, so CI sends the same ones every run)
to the real app (FastAPI's TestClient, which also runs a webhook's background work
before it returns) over a real Redis. Around every request the whole Redis content is
snapshotted: a rejected request must leave it exactly as it was, and a request to the
Label Studio endpoints that is valid but ignored may touch only bookkeeping keys (the
project set, job records, remembered deletions), never a project's prompt state.
Task URLs aim at an "internal" server that is not allowed and at a secret file outside
LOCAL_FILES_DOCUMENT_ROOT; neither may ever be read.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from backend.label_config import parse_label_config
from backend.ls_client import LabelStudioClient
from backend.model import PROMPT_EVENTS, SegGPTBackend
from backend.results import label_map_to_results
from backend.settings import Settings
from backend.store import PromptStore
from seggpt_model import SegGPTPredictor
from seggpt_model.testing import random_model
from tests.backend.conftest import scene
from tests.backend.local_http import LEGACY_KEY, FakeLabelStudio, LocalServer, Reply

MAX_BODY = 256 * 1024  # MAX_REQUEST_BYTES here: oversized bodies stay cheap to send
PROJECT = "1.1795551004"
SEED_ANNOTATION, SEED_TASK = 1, 100  # the prompt seeded before fuzzing; fuzzed ids never use these
MIN_REQUESTS = {"predict": 100, "task_urls": 80, "setup": 60, "webhook": 150, "versions": 30, "routes": 100,
                "raw": 120}
assert sum(MIN_REQUESTS.values()) >= 500
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
# Keys a valid request to the Label Studio endpoints may touch without changing any prompt state.
BOOKKEEPING = re.compile(rb"^(seggpt:projects|seggpt:job-seq|seggpt:job:.*|rq:.*"
                         rb"|seggpt:p:\d+:(jobs|deleted|active:.*|backfill.*|problems))$")  # problems: diagnostics
BACKGROUND = re.compile(rb"^seggpt:p:\d+:backfill")  # written by the first-contact backfill thread, at any time
GUARDED = ("/health", "/setup", "/predict", "/webhook", "/versions")

BRUSH = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels></View>"""


def png(size=(64, 48), seed=0) -> bytes:
    buffer = io.BytesIO()
    scene(size=size, seed=seed)[0].save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


# -- the environment: app, Redis, servers, files ----------------------------------------------------------
@dataclass
class Fuzz:
    client: TestClient
    redis: Any
    backend: SegGPTBackend
    allowed: LocalServer
    internal: LocalServer
    ls: LocalServer
    counts: Counter = field(default_factory=Counter)
    version: str = ""  # project 1's model_version: the seed's, or what a valid request on another route made it

    def snapshot(self) -> dict[bytes, tuple]:
        """Every key with its type and value (TTLs left out: they tick), but the backfill's."""
        keys = sorted(k for k in self.redis.keys("*") if not BACKGROUND.match(k))
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
            types = pipe.execute()
            readers = {b"string": pipe.get, b"hash": pipe.hgetall, b"set": pipe.smembers, b"list": lambda k: pipe.lrange(k, 0, -1),
                       b"zset": lambda k: pipe.zrange(k, 0, -1, withscores=True), b"stream": pipe.xrange}
            for key, kind in zip(keys, types):
                readers.get(kind, pipe.dump)(key)
            values = pipe.execute()
        return {k: (t, v) for k, t, v in zip(keys, types, values)}

    def send(self, family: str, method: str, path: str, **kwargs: Any):
        before = self.snapshot()
        response = self.client.request(method, path, **kwargs)
        self.counts[family] += 1
        where = f"{method} {path} -> {response.status_code} {response.text[:300]!r}"
        assert response.status_code < 500, where
        assert "Traceback" not in response.text and 'File "' not in response.text, where
        after = self.snapshot()
        if response.status_code >= 400:
            assert isinstance(response.json().get("detail"), str), where
            assert after == before, f"rejected request changed stored state: {changed(before, after)}; {where}"
        elif path.split("?")[0] in GUARDED:
            touched = [k for k in changed(before, after) if not BOOKKEEPING.match(k)]
            assert not touched, f"ignored request changed {touched}; {where}"
        else:  # e.g. a rollback or a settings change that happened to be valid
            self.version = self.backend.model_version("1")
        return response

    def send_json(self, family: str, method: str, path: str, body: Any, **kwargs: Any):
        """JSON encoded here, so that NaN and Infinity go out as the literals Python's parser accepts."""
        return self.send(family, method, path, content=json.dumps(body),
                         headers={"Content-Type": "application/json"}, **kwargs)

    def assert_healthy(self) -> None:
        health = self.client.get("/health")
        assert health.status_code == 200 and health.json()["redis"] == "ok"
        body = {"project": PROJECT, "label_config": BRUSH, "tasks": [{"id": 5, "data": {"image": DATA_URL}}]}
        [prediction] = self.client.post("/predict", json=body).json()["results"]
        assert "reason" not in prediction and prediction["model_version"] == self.backend.model_version("1")
        assert self.backend.model_version("1") == self.version, "a rejected or ignored request changed the prompts"
        assert self.internal.requests == [], "a request reached the internal server"


def changed(before: dict, after: dict) -> list[bytes]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture(scope="module")
def fuzz(redis_server, tmp_path_factory) -> Iterator[Fuzz]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread; CI has two cores
    tmp = tmp_path_factory.mktemp("fuzz")
    root = tmp / "root"
    (root / "images").mkdir(parents=True)
    (root / "ok.png").write_bytes(PNG)
    (tmp / "secret.png").write_bytes(png((77, 33), seed=7))
    (root / "images" / "link.png").symlink_to(tmp / "secret.png")
    with LocalServer() as allowed, LocalServer() as internal, LocalServer() as ls:
        allowed.route("GET", "/img.png", Reply(200, PNG, {"Content-Type": "image/png"}))
        allowed.route("GET", "/redirect", lambda r: Reply(302, b"", {"Location": (r.query.get("to") or ["/"])[0]}))
        label_studio = FakeLabelStudio(ls)
        label_studio.serve("/data/upload/1/img.png", Reply(200, PNG))
        ls.routes = _AnyProject(ls.routes, label_studio.authed(lambda r: Reply.json({"id": 1, "label_config": BRUSH})))
        config = Settings(model_dir=tmp / "model", device="cpu", label_studio_url=ls.url,
                          label_studio_api_key=LEGACY_KEY,
                          allowed_media_hosts=(f"127.0.0.1:{allowed.port}",), local_files_document_root=root,
                          min_region_area=1, media_timeout=2.0, max_request_bytes=MAX_BODY)
        redis_server.flushall()
        backend = SegGPTBackend(config, PromptStore(redis_server), client=LabelStudioClient(ls.url, LEGACY_KEY),
                                predictor=SegGPTPredictor(random_model(), device="cpu"))
        with TestClient(create_app(config, backend), raise_server_exceptions=False) as client:
            env = Fuzz(client, redis_server, backend, allowed, internal, ls)
            _, label_map = scene()
            control = parse_label_config(BRUSH)[0]
            seed = {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": BRUSH},
                    "annotation": {"id": SEED_ANNOTATION, "task": SEED_TASK, "updated_at": "2026-01-01T00:00:00Z",
                                   "result": label_map_to_results(label_map, None, control, min_area=1)},
                    "task": {"id": SEED_TASK, "data": {"image": DATA_URL}}}
            assert client.post("/webhook", json=seed).status_code == 200
            env.version = backend.model_version("1")
            assert env.version.endswith("-v1")
            env.assert_healthy()  # the seed was applied: predictions run the model
            yield env
        print(f"\nfuzz requests: {dict(env.counts)}, total {sum(env.counts.values())}")
    torch.set_num_threads(threads)


class _AnyProject(dict):
    """Routes of the fake Label Studio, which also knows every project id the fuzzer asks about."""

    def __init__(self, routes: dict, project: Any) -> None:
        super().__init__(routes)
        self.project = project

    def get(self, key: tuple[str, str], default: Any = None) -> Any:
        if key[0] == "GET" and re.fullmatch(r"/api/projects/\d+/", key[1]):
            return self.project
        return super().get(key, default)


# -- strategies ----------------------------------------------------------------------------------------
NASTY = [None, True, False, 0, -1, -(2**63) - 1, 2**63, 2**64 + 1, 10**30, -(10**30), 1.5, -0.0, 1e308, -1e308,
         float("nan"), float("inf"), float("-inf"), "", " ", "1", "0", "-1", "x", "١٢", "²", "1.2.3", "\x00",
         "\u202e", "😀", "../../etc/passwd", "%2e%2e", "<View/>", "x" * 5000, [], [None], {}, {"": None}]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12))
json_values = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=10)
weird = st.one_of(st.sampled_from(NASTY), json_values)
ids = st.one_of(st.integers(1000, 10**9), weird.filter(lambda v: v not in (SEED_ANNOTATION, SEED_TASK)))
projects = st.one_of(st.sampled_from([PROJECT, "1", 1, "2.5", "0", "99999999999999999999", "1e3", "+1", " 1", "1 ",
                                      "0x1", "1_0", "-1", "1.", ".1"]), weird)
CONFIGS = [
    BRUSH, "", "<View", "<View/>", "<View><Text name='t' value='$t'/></View>",
    "<View><Image name='i' value='image'/><BrushLabels name='b' toName='i'><Label value='A'/></BrushLabels></View>",
    "<View><Image name='i' value='$i'/><BrushLabels name='b' toName='nowhere'><Label value='A'/></BrushLabels></View>",
    "<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'></BrushLabels></View>",
    "<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'>"
    + "".join(f"<Label value='L{i}'/>" for i in range(40)) + "</BrushLabels></View>",
    "<View><Image name='i' valueList='$i'/><BrushLabels name='b' toName='i'><Label value='A'/></BrushLabels></View>",
    '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY a{i} "{("&a;" if i == 1 else f"&a{i - 1};") * 10}">' for i in range(1, 9)) + "]>"
    + "<View><Image name='i' value='$i'/><Header value='&a8;'/></View>",
    '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><View><Header value="&e;"/></View>',
    "<View>" * 3000 + "</View>" * 3000,
    "<View>\x00</View>",
]
configs = st.one_of(st.sampled_from(CONFIGS), st.text(max_size=40), weird)


def mutants(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid bodies with one or two fields, at any depth, dropped or replaced by odd values.

    Near misses get past the first checks and reach the code behind them, which wholly
    random bodies rarely do.
    """
    edit = st.tuples(st.integers(0, 10**6), st.booleans(), weird)
    return st.builds(_mutate, valid, st.lists(edit, min_size=1, max_size=2))


def _mutate(body: Any, edits: list[tuple[int, bool, Any]]) -> Any:
    for pick, drop, value in edits:
        paths = list(_paths(body))
        *parents, last = paths[pick % len(paths)]
        if not parents and last is None:  # the whole body
            body = value
            continue
        holder = body
        for step in parents:
            holder = holder[step]
        if drop and isinstance(holder, dict):
            del holder[last]
        else:
            holder[last] = value
    return body


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix or (None,)
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def task_urls(env: Fuzz) -> tuple[list[str], list[str]]:
    """(URLs that must be refused, URLs that may be read): SSRF forms, traversal, odd schemes."""
    internal, allowed, ls = env.internal.port, env.allowed.port, env.ls.url
    target = f"127.0.0.1:{internal}"
    hosts = [f"localhost:{internal}", f"[::1]:{internal}", f"[::ffff:127.0.0.1]:{internal}", f"2130706433:{internal}",
             f"0177.0.0.1:{internal}", f"0x7f.0.0.1:{internal}", f"127.1:{internal}", target, f"127.0.0.1.:{internal}",
             f"127.0.0.1:{allowed}@{target}", f"{target}@127.0.0.1:{allowed}", f"127.0.0.1:{allowed}\\@{target}",
             f"127.0.0.1:{allowed}:{internal}", f"[127.0.0.1]:{internal}", f"127.0.0.1:{internal}0000",
             f"%31%32%37.0.0.1:{internal}", f"127.0.0.1%00.example.com:{internal}", "169.254.169.254"]
    refused = [f"{scheme}://{host}/x.png" for host in hosts for scheme in ("http", "HTTP", "https")]
    refused += [f"http://127.0.0.1:{allowed}/redirect?to={quote(u, safe='')}" for u in
                (f"http://{target}/x.png", f"http://localhost:{internal}/x.png", f"//{target}/x.png",
                 "file:///etc/passwd", f"gopher://{target}/_x", f"http://127.0.0.1:{allowed}@{target}/x.png")]
    refused += [f"{scheme}{target}/x.png" for scheme in ("//", "gopher://", "dict://", "ftp://", "ldap://", "ws://")]
    refused += ["file:///etc/passwd", "javascript:alert(1)", "data:text/html,<b>x</b>", "data:image/png;base64,!!",
                "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode(),
                "", " ", "\x00", "images/ok.png", "s3://bucket/x.png", f"http://127.0.0.1:{allowed}/missing.png"]
    traversal = ["../secret.png", "images/../../secret.png", "%2e%2e/secret.png", "images/%2E%2E/%2E%2E/secret.png",
                 "images/..%2f..%2fsecret.png", "/etc/passwd", "images/link.png", "..", "./../secret.png",
                 "images/%252e%252e/%252e%252e/secret.png", "ok.png%00.txt", "ok.png\x00"]
    refused += [f"{prefix}/data/local-files/?d={d}" for d in traversal for prefix in ("", ls)]
    readable = [DATA_URL, f"http://127.0.0.1:{allowed}/img.png", "/data/local-files/?d=ok.png",
                "/data/upload/1/img.png", f"http://127.0.0.1:{allowed}/redirect?to=/img.png"]
    return refused, readable


# -- the families ----------------------------------------------------------------------------------------
def test_fuzz_predict_bodies(fuzz: Fuzz) -> None:
    """Missing fields, wrong types, huge and negative numbers, odd projects and label configs."""
    task = st.fixed_dictionaries({}, optional={"id": ids, "data": st.one_of(
        st.fixed_dictionaries({"image": st.one_of(st.just(DATA_URL), weird)}), weird),
        "annotations": weird, "predictions": weird, "meta": weird})
    body = st.fixed_dictionaries({}, optional={
        "tasks": st.one_of(st.lists(task, min_size=0, max_size=3), weird), "project": projects,
        "label_config": configs, "params": st.one_of(st.fixed_dictionaries({}, optional={"context": weird}), weird),
        "extra": weird})
    valid_task = st.fixed_dictionaries({"id": st.integers(1, 10**6), "data": st.just({"image": DATA_URL})},
                                       optional={"annotations": st.just([]), "meta": st.just({})})
    valid = st.fixed_dictionaries({"tasks": st.lists(valid_task, min_size=1, max_size=2), "project": st.just(PROJECT),
                                   "label_config": st.just(BRUSH),
                                   "params": st.just({"login": None, "password": None, "context": None})})

    @FUZZ
    @given(body=st.one_of(mutants(valid), body, weird))
    def run(body: Any) -> None:
        response = fuzz.send_json("predict", "POST", "/predict", body)
        if response.status_code == 200:
            assert len(response.json()["results"]) == len(body["tasks"])

    run()
    assert fuzz.counts["predict"] >= MIN_REQUESTS["predict"]
    fuzz.assert_healthy()


def test_fuzz_task_urls_never_reach_forbidden_hosts_or_files(fuzz: Fuzz) -> None:
    """Valid requests whose task URLs are hostile: one answer per task, refused ones with a reason."""
    refused, readable = task_urls(fuzz)
    url = st.one_of(st.sampled_from(refused), st.sampled_from(readable), st.text(max_size=30),
                    st.builds("{}://{}/{}".format, st.sampled_from(["http", "https", "HTTP", "file", ""]),
                              st.text(string.printable, max_size=25), st.text(max_size=10)))
    tasks = st.lists(st.fixed_dictionaries({"id": st.integers(-(2**63), 2**63 - 1), "data": st.fixed_dictionaries(
        {"image": url})}), min_size=1, max_size=3)

    @settings(FUZZ, max_examples=MIN_REQUESTS["task_urls"] + 10)
    @given(tasks=tasks)
    def run(tasks: list[dict]) -> None:
        body = {"project": PROJECT, "label_config": BRUSH, "tasks": tasks}
        response = fuzz.send_json("task_urls", "POST", "/predict", body)
        assert response.status_code == 200
        results = response.json()["results"]
        assert len(results) == len(tasks)
        for sent, result in zip(tasks, results):
            assert isinstance(result["model_version"], str)
            if sent["data"]["image"] in refused:
                assert "result" not in result and result["reason"], sent  # Label Studio stores nothing
            if sent["data"]["image"] in readable:
                assert "reason" not in result and isinstance(result["result"], list), (sent, result)

    run()
    assert fuzz.counts["task_urls"] >= MIN_REQUESTS["task_urls"]
    assert fuzz.internal.requests == []
    fuzz.assert_healthy()


def test_fuzz_setup(fuzz: Fuzz) -> None:
    body = st.fixed_dictionaries({}, optional={"project": projects, "schema": configs, "extra_params": weird,
                                               "hostname": weird, "access_token": weird})
    valid = st.fixed_dictionaries({"project": st.just(PROJECT), "schema": st.just(BRUSH), "extra_params": weird,
                                   "hostname": st.just("http://ls:8080"), "access_token": st.just("token")})

    @settings(FUZZ, max_examples=MIN_REQUESTS["setup"] + 10)
    @given(body=st.one_of(mutants(valid), body, weird))
    def run(body: Any) -> None:
        response = fuzz.send_json("setup", "POST", "/setup", body)
        if response.status_code == 200:
            assert re.fullmatch(r"seggpt-\w+-v\d+", response.json()["model_version"])

    run()
    assert fuzz.counts["setup"] >= MIN_REQUESTS["setup"]
    fuzz.assert_healthy()


def invalid_rle() -> st.SearchStrategy:
    """Brush RLE that no image can take: wrong types, bytes out of range, wrong headers, cut streams."""
    control = parse_label_config(BRUSH)[0]
    [good] = label_map_to_results(scene()[1], None, control, min_area=1)
    rle = good["value"]["rle"]
    wrong_size = [0, 0, 0, 16] + rle[4:]  # a 2x2 image's count on a 64x48 one
    return st.one_of(weird, st.sampled_from([rle[: len(rle) // 2], rle[:10], rle[:6], wrong_size, rle[:4] + [0] + rle[5:],
                                             [256] * 20, [-1] * 20, [1.5] * 20, ["a"] * 20, rle[:4] + [10**20] * 10]),
                     st.lists(st.integers(0, 255), max_size=6))


def test_fuzz_webhooks(fuzz: Fuzz, caplog) -> None:
    """Unknown actions, malformed payloads, invalid RLE, polygons and boxes: never applied."""
    labels = st.one_of(st.just(["Cat"]), st.sampled_from([["Unknown"], "Cat", [None], [{}], [], None]))
    brush_value = st.fixed_dictionaries({"format": st.sampled_from(["rle", "rle", "png", None]), "rle": invalid_rle(),
                                         "brushlabels": labels})
    polygon_value = st.fixed_dictionaries({"points": st.one_of(weird, st.sampled_from(
        [[[0, 0], [1e9, 0], [0, 5]], [[0, 0]], [[float("nan"), 1]] * 3, [["a", "b"]] * 3, [[1, 2, 3]] * 3])),
        "polygonlabels": labels})
    rectangle_value = st.fixed_dictionaries({k: st.sampled_from([float("nan"), float("inf"), 1e300, "10", None])
                                             for k in ("x", "y", "width", "height")}, optional={"rectanglelabels": labels})
    typed = st.one_of(st.tuples(st.just("brushlabels"), brush_value), st.tuples(st.just("polygonlabels"), polygon_value),
                      st.tuples(st.just("rectanglelabels"), rectangle_value),
                      st.tuples(st.sampled_from(["x", "choices", "keypointlabels"]), weird))
    result = st.builds(lambda name, kind_value, extra: {"from_name": name, "to_name": "image", "type": kind_value[0],
                                                        "value": kind_value[1], **extra},
                       st.sampled_from(["tag", "tag", "poly", ""]), typed,
                       st.fixed_dictionaries({}, optional={"original_width": weird, "original_height": weird}))
    annotation = st.fixed_dictionaries({"id": ids, "task": st.one_of(st.just(7777), ids)}, optional={
        "result": st.one_of(st.lists(result, min_size=1, max_size=3), weird), "was_cancelled": weird,
        "updated_at": weird})
    task = st.fixed_dictionaries({"id": st.one_of(st.just(7777), ids)}, optional={
        "data": st.one_of(st.just({"image": DATA_URL}), st.fixed_dictionaries({"image": weird}), weird)})
    project = st.one_of(st.just({"id": 1, "label_config": BRUSH}), st.fixed_dictionaries(
        {}, optional={"id": projects, "label_config": configs}), projects)
    actions = st.one_of(st.sampled_from(sorted(PROMPT_EVENTS) * 3 + ["START_TRAINING", "PROJECT_UPDATED",
                                                                      "TASKS_CREATED", "annotation_created", "",
                                                                      "A" * 101]), st.text(max_size=20), weird)
    body = st.fixed_dictionaries({}, optional={
        "action": actions, "project": project, "annotation": st.one_of(annotation, st.lists(annotation, max_size=2), weird),
        "task": st.one_of(task, st.lists(task, max_size=2), weird),
        "annotations": st.one_of(st.lists(st.fixed_dictionaries({"id": ids}), max_size=3), weird),
        "tasks": st.one_of(st.lists(st.fixed_dictionaries({"id": ids}), max_size=3), weird)})

    annotated = st.fixed_dictionaries({
        "action": st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]), "project": st.just(
            {"id": 1, "label_config": BRUSH}), "task": st.just({"id": 7777, "data": {"image": DATA_URL}}),
        "annotation": st.fixed_dictionaries({"id": st.integers(1000, 10**6), "task": st.just(7777),
                                             "result": st.lists(result.filter(lambda r: r["from_name"] == "tag"),
                                                                min_size=1, max_size=2)})})
    deleted = st.fixed_dictionaries({"action": st.sampled_from(["ANNOTATIONS_DELETED", "TASKS_DELETED"]),
                                     "project": st.just({"id": 1}),
                                     "annotations": st.lists(st.fixed_dictionaries({"id": st.integers(1000, 10**6)})),
                                     "tasks": st.lists(st.fixed_dictionaries({"id": st.integers(1000, 10**6)}))})

    def explicit(kind: str, value: dict) -> dict:  # every refusal category at least once, whatever is generated
        return {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": BRUSH},
                "task": {"id": 7777, "data": {"image": DATA_URL}},
                "annotation": {"id": 1001, "task": 7777, "result": [
                    {"from_name": "tag", "to_name": "image", "type": kind, "value": value}]}}

    @settings(FUZZ, max_examples=60)
    @given(body=annotated)
    @example(body=explicit("rectanglelabels", {"x": float("nan"), "y": 0, "width": 10, "height": 10,
                                               "rectanglelabels": ["Cat"]}))
    @example(body=explicit("polygonlabels", {"points": [[0, 0]], "polygonlabels": ["Cat"]}))
    @example(body=explicit("brushlabels", {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["Cat"]}))
    @example(body=explicit("brushlabels", {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["Unknown"]}))
    @example(body=explicit("choices", {"choices": ["Cat"]}))
    def run_annotated(body: dict) -> None:
        response = fuzz.send_json("webhook", "POST", "/webhook", body)
        assert response.status_code == 200 and response.json()["status"] == "accepted"

    @settings(FUZZ, max_examples=MIN_REQUESTS["webhook"] - 40)
    @given(body=st.one_of(mutants(annotated), mutants(deleted), body, weird))
    def run(body: Any) -> None:
        fuzz.send_json("webhook", "POST", "/webhook", body)

    with caplog.at_level(logging.WARNING, logger="backend"):
        run_annotated()
        run()
    refusals = caplog.text
    for reason in ("invalid brush RLE", "invalid polygon", "invalid rectangle", "unknown label", "unsupported type"):
        assert reason in refusals, f"no fuzzed webhook reached the {reason!r} check"
    assert " failed: " not in refusals  # every refusal is a ValueError naming the problem, not a crash
    assert fuzz.counts["webhook"] >= MIN_REQUESTS["webhook"]
    fuzz.assert_healthy()


def test_fuzz_versions_and_health(fuzz: Fuzz) -> None:
    @settings(FUZZ, max_examples=MIN_REQUESTS["versions"] + 5)
    @given(path=st.sampled_from(["/versions", "/health"]), params=st.dictionaries(
        st.sampled_from(["project", "x", ""]), st.one_of(st.text(max_size=30), st.sampled_from(NASTY[18:30])),
        max_size=2))
    def run(path: str, params: dict) -> None:
        response = fuzz.send("versions", "GET", path, params=params)
        if response.status_code == 200 and path == "/versions":
            assert all(isinstance(v, str) for v in response.json()["versions"])

    run()
    assert fuzz.counts["versions"] >= MIN_REQUESTS["versions"]
    fuzz.assert_healthy()


path_values = st.one_of(st.sampled_from(["1", PROJECT, "0", "-1", "99999999999999999999999", "abc", "..", "%2e%2e",
                                         "..%2f..%2fetc", "1;2", "١", "\u202e", "x" * 300, "tune-1", "prelabel-1"]),
                        st.integers(-(2**70), 2**70).map(str), st.text(max_size=20))
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=xyz", "application/zip", "application/octet-stream",
                 "application/json; charset=utf-16", "application/problem+json", None]


def routes(client: TestClient) -> list[tuple[str, str, list[str]]]:
    """Every (method, path template, query parameters) the app serves, from its OpenAPI description."""
    found = []
    for path, operations in client.app.openapi()["paths"].items():
        for method, operation in operations.items():
            query = [p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"]
            found.append((method.upper(), path, query))
    return found


def test_fuzz_every_route(fuzz: Fuzz) -> None:
    """All routes, those other modules add included: odd path and query values, any body and content type."""
    served = routes(fuzz.client)
    assert {("POST", "/predict"), ("POST", "/webhook"), ("GET", "/health")} <= {(m, p) for m, p, _ in served}
    per_route = max(MIN_REQUESTS["routes"] // len(served) + 1, 8)
    for method, template, query in served:
        names = re.findall(r"{(\w+)}", template)

        @settings(FUZZ, max_examples=per_route)
        @given(values=st.fixed_dictionaries({n: path_values for n in names}),
               params=st.fixed_dictionaries({}, optional={q: st.one_of(path_values, st.lists(path_values, max_size=2))
                                                          for q in [*query, "extra"]}),
               body=st.one_of(st.none(), json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64)),
               content_type=st.sampled_from(CONTENT_TYPES))
        def run(values: dict, params: dict, body: bytes | None, content_type: str | None) -> None:
            path = template.format(**{k: quote(v, safe="") for k, v in values.items()})
            headers = {"Content-Type": content_type} if content_type and body is not None else {}
            fuzz.send("routes", method, path, params=params, content=body, headers=headers)

        run()
    assert fuzz.counts["routes"] >= MIN_REQUESTS["routes"]
    fuzz.assert_healthy()


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


RAW_BODIES = [b"", b"null", b"[]", b"{}", b"\xff\xfe\x00", b"{", b'{"a":1,}', b"NaN", b"-Infinity", b'{"tasks": 1e999}',
              b"9" * 5000, b'{"project":' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000, nested(20_000),
              nested(900), b"\xef\xbb\xbf{}", b'{"action":"\\u0000"}', b'{"action":"A","action":"PROJECT_UPDATED"}',
              '{"action":"PROJECT_UPDATED"}'.encode("utf-16"), b"a=1&b=2", b"--xyz\r\n\r\n--xyz--", b"PK\x03\x04" + b"\0" * 30,
              b'{"tasks":[' + b'{"id":1,"data":{}},' * 20_000 + b"{}]}",  # over MAX_REQUEST_BYTES
              b"[" + b"0," * (MAX_BODY // 2 - 10) + b"0]"]  # just under it


def test_fuzz_raw_bodies(fuzz: Fuzz) -> None:
    """Bodies that are not JSON, broken JSON, deep nesting, huge numbers, oversized or chunked, any content type."""
    served = [(m, p) for m, p, _ in routes(fuzz.client)]

    @settings(FUZZ, max_examples=MIN_REQUESTS["raw"] + 20)
    @given(route=st.sampled_from(served), body=st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=200)),
           content_type=st.sampled_from(CONTENT_TYPES), chunked=st.booleans())
    def run(route: tuple[str, str], body: bytes, content_type: str | None, chunked: bool) -> None:
        method, template = route
        path = template.replace("{project}", "1").replace("{job_id}", "tune-1")
        headers = {"Content-Type": content_type} if content_type else {}
        content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
        response = fuzz.send("raw", method, path, content=content, headers=headers)
        if len(body) > MAX_BODY:
            assert response.status_code == 413 and "MAX_REQUEST_BYTES" in response.json()["detail"]

    run()
    assert fuzz.counts["raw"] >= MIN_REQUESTS["raw"]
    fuzz.assert_healthy()
