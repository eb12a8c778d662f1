"""LabelStudioClient against a real local HTTP server that behaves like Label Studio 1.23's API."""

import socket

import pytest

from backend.ls_client import LabelStudioClient, LabelStudioError, jwt_claims
from tests.backend.local_http import LEGACY_KEY, FakeLabelStudio, make_jwt, server  # noqa: F401  (fixture)


def task(i, annotations):
    return {"id": i, "data": {"image": f"/data/upload/1/img{i}.png"}, "annotations": annotations}


def test_legacy_token_is_sent_as_token_header(server):
    ls = FakeLabelStudio(server)
    with LabelStudioClient(server.url + "/", LEGACY_KEY) as client:
        assert client.auth_headers() == {"Authorization": f"Token {LEGACY_KEY}"}
        assert client.get_project(1) == {"id": 1, "title": "p"}
    assert ls.refreshes == 0


def test_pat_is_exchanged_for_an_access_token_and_never_sent_raw(server):
    ls = FakeLabelStudio(server, legacy_enabled=False)
    with LabelStudioClient(server.url, ls.pat) as client:
        for _ in range(3):
            assert client.get_project(1)["id"] == 1
        assert client.auth_headers()["Authorization"].startswith("Bearer ")
    assert ls.refreshes == 1
    sent = [r.headers.get("Authorization", "") for r in server.requests]
    assert all(ls.pat not in h for h in sent)
    assert server.hits("/api/token/refresh/")[0].json() == {"refresh": ls.pat}


def test_pat_is_refreshed_before_the_access_token_expires(server):
    ls = FakeLabelStudio(server, access_lifetime=20)  # inside the client's refresh margin
    with LabelStudioClient(server.url, ls.pat) as client:
        for _ in range(3):
            client.get_project(1)
    assert ls.refreshes == 3


def test_revoked_access_token_is_refreshed_once_and_the_call_retried(server):
    ls = FakeLabelStudio(server)
    with LabelStudioClient(server.url, ls.pat) as client:
        client.get_project(1)
        ls.valid_access.clear()  # e.g. Label Studio restarted with a new signing key
        assert client.get_project(1)["id"] == 1
    assert ls.refreshes == 2


def test_invalid_pat_gives_a_clear_error_without_the_token(server):
    FakeLabelStudio(server)
    bad_pat = make_jwt("refresh", 1000, "someone-elses")
    with LabelStudioClient(server.url, bad_pat) as client, pytest.raises(LabelStudioError) as info:
        client.get_project(1)
    assert info.value.status == 401
    assert "token refresh failed" in str(info.value) and "personal access token" in str(info.value)
    assert bad_pat not in str(info.value)


def test_wrong_legacy_key_is_a_401_error(server):
    FakeLabelStudio(server)
    with LabelStudioClient(server.url, "wrong-key") as client, pytest.raises(LabelStudioError, match="HTTP 401"):
        client.get_project(1)


def test_error_details_never_echo_the_key(server):
    FakeLabelStudio(server)
    with LabelStudioClient(server.url, LEGACY_KEY) as client, pytest.raises(LabelStudioError) as info:
        client.get("/api/echo-auth/")
    assert info.value.status == 500
    assert LEGACY_KEY not in str(info.value) and "***" in str(info.value)


def test_non_json_answer_is_an_error(server):
    FakeLabelStudio(server)
    with LabelStudioClient(server.url, LEGACY_KEY) as client, pytest.raises(LabelStudioError, match="non-JSON"):
        client.get("/api/not-json/")


def test_unreachable_label_studio():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the client connects
    with LabelStudioClient(f"http://127.0.0.1:{port}", LEGACY_KEY) as client:
        with pytest.raises(LabelStudioError, match="cannot reach Label Studio") as info:
            client.get_project(1)
    assert LEGACY_KEY not in str(info.value)


def test_iter_tasks_pages_through_annotated_tasks(server):
    tasks = [
        task(1, [{"id": 1, "result": [], "was_cancelled": False}]),
        task(2, []),
        task(3, [{"id": 2, "result": [], "was_cancelled": True}]),
        task(4, [{"id": 3, "result": [{"from_name": "tag"}], "was_cancelled": False}]),
        task(5, []),
        task(6, [{"id": 4, "result": [], "was_cancelled": True}, {"id": 5, "result": []}]),
        task(7, []),
    ]
    ls = FakeLabelStudio(server, tasks)
    with LabelStudioClient(server.url, ls.pat) as client:
        got = list(client.iter_tasks(1, page_size=2))
        everything = list(client.iter_tasks(1, annotated_only=False, page_size=3))
    assert [t["id"] for t in got] == [1, 4, 6]
    assert got[1]["annotations"][0]["result"] == [{"from_name": "tag"}]
    assert [t["id"] for t in everything] == [1, 2, 3, 4, 5, 6, 7]
    listing = server.hits("/api/tasks/")
    assert [r.query["page"] for r in listing[:4]] == [["1"], ["2"], ["3"], ["4"]]
    assert all(r.query["project"] == ["1"] and r.query["fields"] == ["all"] for r in listing)
    assert "total_annotations" in listing[0].query["query"][0]


def test_iter_tasks_stops_on_an_empty_project(server):
    ls = FakeLabelStudio(server, [])
    with LabelStudioClient(server.url, LEGACY_KEY) as client:
        assert list(client.iter_tasks(1)) == []
    assert ls.refreshes == 0 and len(server.hits("/api/tasks/")) == 1


def test_get_task(server):
    FakeLabelStudio(server, [task(1, []), task(2, [{"id": 9, "result": []}])])
    with LabelStudioClient(server.url, LEGACY_KEY) as client:
        assert client.get_task(2)["annotations"][0]["id"] == 9


def test_create_prediction_posts_the_label_studio_body(server):
    ls = FakeLabelStudio(server)
    result = [{"from_name": "tag", "to_name": "image", "type": "brushlabels", "value": {}}]
    with LabelStudioClient(server.url, ls.pat) as client:
        created = client.create_prediction(7, result, 0.75, "seggpt-abc")
    assert ls.predictions == [{"task": 7, "result": result, "score": 0.75, "model_version": "seggpt-abc"}]
    assert created["id"] == 1


def test_jwt_claims_only_for_jwt_shaped_tokens():
    assert jwt_claims(LEGACY_KEY) is None
    assert jwt_claims("a.b.c") is None
    assert jwt_claims(make_jwt("refresh", 10, "x"))["token_type"] == "refresh"


def test_client_needs_url_and_key():
    with pytest.raises(ValueError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient("http://ls", "")
