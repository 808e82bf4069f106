"""Tier 2: the HTTP API in-process (TestClient) on a real SQLite file and the real PostgreSQL."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.db import Database
from service.settings import Settings
from service.worker import Worker

TINY = {
    "name": "tiny",
    "network": {"layers": [{"type": "linear", "out_features": 16}, {"type": "relu"}, {"type": "linear", "out_features": 3}]},
    "data": {"name": "blobs", "features": 4, "classes": 3, "n_samples": 120, "seed": 0},
    "training": {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": 2, "seed": 0},
}


def settings_for(database: Database, **extra: Any) -> Settings:
    return Settings(database_url=database.engine.url.render_as_string(hide_password=False), **extra)


@pytest.fixture
def client(database: Database) -> TestClient:
    with TestClient(create_app(settings_for(database), database)) as c:
        yield c


def problem(response, status: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def with_(path: str, value: Any, base: dict | None = None) -> dict:
    """TINY with the value at JSON Pointer `path` replaced (None removes it)."""
    spec = copy.deepcopy(base or TINY)
    parts = path.strip("/").split("/")
    node: Any = spec
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return spec


# Twenty-plus ways to get a spec wrong; each must come back 422 naming the field, never queued.
BAD_SPECS = [
    ("unknown layer type", with_("/network/layers/1/type", "relu6"), "/network/layers/1/type"),
    ("unknown activation-ish field", with_("/network/layers/1", {"type": "relu", "inplace": True}), "/network/layers/1"),
    ("no layers", with_("/network/layers", []), "/network/layers"),
    ("missing network", with_("/network", None), "/network"),
    ("zero out_features", with_("/network/layers/0/out_features", 0), "/network/layers/0/out_features"),
    ("string out_features", with_("/network/layers/0/out_features", "16"), "/network/layers/0/out_features"),
    ("output size vs classes", with_("/network/layers/2/out_features", 7), "/network/layers/2/out_features"),
    ("unknown init", with_("/network/layers/0/init", "he"), "/network/layers/0/init"),
    ("conv on flat input", with_("/network/layers/0", {"type": "conv2d", "out_channels": 4, "kernel_size": 3}), "/network/layers/0"),
    ("rnn on flat input", with_("/network/layers/0", {"type": "rnn", "cell": "lstm", "hidden_size": 8}), "/network/layers/0"),
    ("unknown rnn cell", with_("/network/layers/0", {"type": "rnn", "cell": "transformer", "hidden_size": 8}), "/network/layers/0/cell"),
    ("residual changes shape", with_("/network/layers/1", {"type": "residual", "layers": [{"type": "linear", "out_features": 5}]}), "/network/layers/1"),
    ("repeat zero times", with_("/network/layers/1", {"type": "repeat", "times": 0, "layers": [{"type": "relu"}]}), "/network/layers/1/times"),
    ("dropout p = 1", with_("/network/layers/1", {"type": "dropout", "p": 1.0}), "/network/layers/1/p"),
    ("unknown dataset", with_("/data/name", "imagenet"), "/data/name"),
    ("too many samples", with_("/data/n_samples", 10_000_000), "/data/n_samples"),
    ("negative lr", with_("/training/lr", -0.1), "/training/lr"),
    ("zero batch", with_("/training/batch_size", 0), "/training/batch_size"),
    ("too many epochs", with_("/training/epochs", 5000), "/training/epochs"),
    ("unknown optimizer", with_("/training/optimizer", "lbfgs"), "/training/optimizer"),
    ("bad device", with_("/training/device", "tpu"), "/training/device"),
    ("clip max_norm 0", with_("/training/grad_clip", {"max_norm": 0}), "/training/grad_clip"),
    ("verify too many", with_("/analysis", {"verify_remedies": 4}), "/analysis/verify_remedies"),
    ("unknown threshold", with_("/analysis", {"thresholds": {"vanishing_ration": 1e-3}}), "/analysis/thresholds/vanishing_ration"),
    ("typo in training", with_("/training/learning_rate", 0.1), "/training/learning_rate"),
    ("input_shape disagrees", with_("/network/input_shape", [5]), "/network/input_shape"),
    ("too many parameters", with_("/network/layers/0/out_features", 10_000_000), "/network"),
    ("too many layers", with_("/network/layers/1", {"type": "repeat", "times": 3000, "layers": [{"type": "relu"}]}), "/network"),
    ("callback not http", {**TINY, "callback_url": "file:///etc/passwd"}, "/callback_url"),
    ("bad source", {**TINY, "source": "magic"}, "/source"),
]


@pytest.mark.parametrize("label,spec,pointer", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_is_refused_with_the_field_named_and_never_queued(client: TestClient, label: str, spec: dict, pointer: str) -> None:
    body = problem(client.post("/v1/jobs", json=spec), 422)
    pointers = [e["pointer"] for e in body["errors"]]
    assert any(p == pointer or p.startswith(pointer + "/") or pointer.startswith(p + "/") and p for p in pointers), (label, pointers)
    assert client.get("/v1/jobs").json()["items"] == []


def test_known_threshold_override_is_accepted_and_a_typo_gets_a_suggestion(client: TestClient) -> None:
    assert client.post("/v1/jobs", json=with_("/analysis", {"thresholds": {"vanishing_ratio": 1e-3}})).status_code == 202
    body = problem(client.post("/v1/jobs", json=with_("/analysis", {"thresholds": {"vanishing_ration": 1e-3}})), 422)
    assert "did you mean vanishing_ratio" in body["detail"]


def test_malformed_json_is_a_400_problem(client: TestClient) -> None:
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    problem(response, 400)


def test_non_object_body_is_a_422_problem(client: TestClient) -> None:
    problem(client.post("/v1/jobs", json=[1, 2]), 422)


def test_submit_get_list_and_idempotency(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "abc"})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["source"] == "spec" and job["spec"] == TINY
    assert job["progress"] == {"epoch": 0, "epochs": 2} and job["verdict"] is None and job["error"] is None
    again = client.post("/v1/jobs", json=TINY, headers={"Idempotency-Key": "abc"})
    assert again.json()["id"] == job["id"] and again.headers.get("idempotent-replayed") == "true"
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [job["id"]]


def test_list_is_newest_first_with_cursor_and_status_filter(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json={**TINY, "name": f"j{i}"}).json()["id"] for i in range(5)]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    seen = [j["id"] for j in page["items"]]
    while page["next_cursor"]:
        page = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        seen += [j["id"] for j in page["items"]]
    assert seen == ids[::-1]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    assert [j["id"] for j in client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]] == [ids[0]]
    problem(client.get("/v1/jobs", params={"status": "exploded"}), 422)
    problem(client.get("/v1/jobs", params={"cursor": "garbage!"}), 422)


def test_unknown_job_is_404_problem(client: TestClient) -> None:
    for path in ("", "/report", "/epochs", "/plots/gradient-flow.png"):
        problem(client.get(f"/v1/jobs/nope{path}"), 404)
    problem(client.post("/v1/jobs/nope/cancel"), 404)


def test_cancel_queued_job_at_once_and_twice_is_409(client: TestClient) -> None:
    job = client.post("/v1/jobs", json=TINY).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)


def test_worker_trains_a_job_and_the_api_serves_its_records_report_and_plot(client: TestClient, database: Database) -> None:
    job = client.post("/v1/jobs", json=TINY).json()
    assert Worker(database, settings_for(database), worker_id="w-test", threads=1).run_once() is True
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["verdict"] in {"healthy", "vanishing", "exploding"}
    assert done["progress"] == {"epoch": 2, "epochs": 2} and done["attempts"] == 1
    epochs = client.get(f"/v1/jobs/{job['id']}/epochs").json()["items"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert [layer["name"] for layer in epochs[0]["layers"]] == ["layers.0.linear", "layers.2.linear"]
    assert epochs[0]["layers"][0]["grad_norm"]["mean"] > 0
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["job_id"] == job["id"] and report["final"] is True and report["verdict"] == done["verdict"]
    csv_text = client.get(f"/v1/jobs/{job['id']}/epochs", headers={"Accept": "text/csv"}).text
    assert csv_text.splitlines()[0].startswith("epoch,loss,nonfinite,layer") and len(csv_text.splitlines()) == 1 + 2 * 2
    png = client.get(f"/v1/jobs/{job['id']}/plots/gradient-flow.png")
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    assert Worker(database, settings_for(database), worker_id="w-test", threads=1).run_once() is False


def record(epoch: int, loss: float | None = 0.5, grad: float | None = 0.1) -> dict[str, Any]:
    return {"epoch": epoch, "loss": loss, "metrics": {"accuracy": 0.5}, "nonfinite": loss is None,
            "layers": [{"name": "fc1", "type": "linear", "grad_norm": {"mean": grad, "min": grad, "max": grad, "last": grad},
                        "grad_max_abs": grad, "weight_norm": 1.0, "update_ratio": 0.01, "nonfinite_grads": 0, "activation": None},
                       {"name": "fc2", "type": "linear", "grad_norm": {"mean": 0.2, "min": 0.2, "max": 0.2, "last": 0.2},
                        "grad_max_abs": 0.2, "weight_norm": 1.0, "update_ratio": 0.01, "nonfinite_grads": 0, "activation": None}],
            "temporal": None}


def test_external_job_streams_epochs_idempotently_and_completes(client: TestClient) -> None:
    created = client.post("/v1/jobs", json={"source": "external", "name": "ext", "layers": [
        {"name": "fc1", "type": "linear"}, {"name": "fc2", "type": "linear"}], "epochs": 3})
    assert created.status_code == 201 and created.headers["location"].endswith(created.json()["id"])
    job_id = created.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/epochs", json=record(1)).status_code == 202
    assert client.post(f"/v1/jobs/{job_id}/epochs", json=[record(2), record(3)]).status_code == 202
    assert client.post(f"/v1/jobs/{job_id}/epochs", json=record(2)).status_code == 202  # a retry
    assert [e["epoch"] for e in client.get(f"/v1/jobs/{job_id}/epochs").json()["items"]] == [1, 2, 3]
    partial = client.get(f"/v1/jobs/{job_id}/report").json()
    assert partial["final"] is False and partial["verdict"] in {"healthy", "vanishing", "exploding"}
    done = client.post(f"/v1/jobs/{job_id}/complete")
    assert done.status_code == 200 and done.json()["status"] == "succeeded"
    final = client.get(f"/v1/jobs/{job_id}/report").json()
    assert final["final"] is True and all(r.get("patch") is None for r in final["recommendations"])
    problem(client.post(f"/v1/jobs/{job_id}/epochs", json=record(4)), 409)


def test_external_nonfinite_values_are_stored_and_returned_as_null(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json={"source": "external", "name": "nan", "layers": [{"name": "fc1", "type": "linear"}]}).json()["id"]
    raw = json.dumps(record(1, loss=float("nan"), grad=float("inf")))  # Python writes NaN/Infinity tokens
    assert client.post(f"/v1/jobs/{job_id}/epochs", content=raw, headers={"content-type": "application/json"}).status_code == 202
    text = client.get(f"/v1/jobs/{job_id}/epochs").text
    assert "NaN" not in text and "Infinity" not in text
    stored = json.loads(text)["items"][0]
    assert stored["loss"] is None and stored["nonfinite"] is True
    assert stored["layers"][0]["grad_norm"]["mean"] is None
    report = client.post(f"/v1/jobs/{job_id}/complete")
    assert report.status_code == 200 and report.json()["verdict"] == "exploding"


def test_epochs_of_a_spec_job_cannot_be_posted_and_bad_records_are_422(client: TestClient) -> None:
    spec_job = client.post("/v1/jobs", json=TINY).json()["id"]
    problem(client.post(f"/v1/jobs/{spec_job}/epochs", json=record(1)), 409)
    problem(client.post(f"/v1/jobs/{spec_job}/complete"), 409)
    ext = client.post("/v1/jobs", json={"source": "external", "name": "e", "layers": [{"name": "a", "type": "linear"}]}).json()["id"]
    body = problem(client.post(f"/v1/jobs/{ext}/epochs", json=[record(1), {"epoch": 0}]), 422)
    assert body["errors"][0]["pointer"].startswith("/1/epoch")
    problem(client.post("/v1/jobs", json={"source": "external", "name": "e", "layers": []}), 422)


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/jobs", json=TINY)
    text = client.get("/metrics").text
    assert 'gradwatch_jobs{status="queued"} 1.0' in text and "gradwatch_queue_depth 1.0" in text
    assert "gradwatch_http_request_duration_seconds_bucket" in text and 'route="/v1/jobs"' in text


def test_readyz_fails_when_the_database_is_unreachable() -> None:
    db = Database("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=1")
    with TestClient(create_app(Settings(database_url=str(db.engine.url)), db)) as c:
        problem(c.get("/readyz"), 503)
        assert c.get("/healthz").status_code == 200


def test_api_keys_tenants_and_no_key_loopback_rule(database: Database) -> None:
    settings = settings_for(database, api_keys="acme:key-a,globex:key-b")
    with TestClient(create_app(settings, database)) as c:
        problem(c.get("/v1/jobs"), 401)
        problem(c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}), 401)
        a = {"Authorization": "Bearer key-a"}
        job = c.post("/v1/jobs", json=TINY, headers=a).json()
        assert c.get(f"/v1/jobs/{job['id']}", headers=a).status_code == 200
        problem(c.get(f"/v1/jobs/{job['id']}", headers={"Authorization": "Bearer key-b"}), 404)
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer key-b"}).json()["items"] == []
        with database.session() as session:
            stored = create_key(session, "initech")
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {stored}"}).status_code == 200
    open_settings = settings_for(database)
    with database.session() as session:
        session.execute(__import__("sqlalchemy").text("DELETE FROM api_keys"))
    with TestClient(create_app(open_settings, database), client=("10.1.2.3", 5555)) as remote:
        problem(remote.get("/v1/jobs"), 403)
    with TestClient(create_app(open_settings, database)) as local:
        assert local.get("/v1/jobs").status_code == 200


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/epochs",
                 "/v1/jobs/{job_id}/complete", "/v1/jobs/{job_id}/report", "/v1/jobs/{job_id}/plots/gradient-flow.png",
                 "/healthz", "/readyz", "/metrics"):
        assert path in paths, path
        for operation in paths[path].values():
            assert operation.get("summary"), path


VANISHING = {
    "name": "sigmoid-stack",
    "network": {"layers": [
        {"type": "repeat", "times": 10, "layers": [
            {"type": "linear", "out_features": 32, "init": {"name": "normal", "std": 0.05}}, {"type": "sigmoid"}]},
        {"type": "linear", "out_features": 3}]},
    "data": {"name": "blobs", "features": 4, "classes": 3, "n_samples": 300, "seed": 0},
    "training": {"optimizer": "sgd", "lr": 0.1, "batch_size": 32, "epochs": 4, "seed": 0},
    "analysis": {"early_stop": True, "verify_remedies": 2},
}


def test_verify_remedies_trains_children_and_the_report_is_final_when_they_are(client: TestClient, database: Database) -> None:
    worker = Worker(database, settings_for(database), worker_id="w-verify", threads=1)
    parent = client.post("/v1/jobs", json=VANISHING).json()
    assert worker.run_once() is True
    job = client.get(f"/v1/jobs/{parent['id']}").json()
    assert job["status"] == "succeeded" and job["verdict"] == "vanishing"
    assert job["report_final"] is False and client.get(f"/v1/jobs/{parent['id']}/report").json()["final"] is False
    children = client.get("/v1/jobs", params={"parent_id": parent["id"]}).json()["items"]
    assert len(children) == 2 and all(c["parent_id"] == parent["id"] and c["status"] == "queued" for c in children)
    top = client.get(f"/v1/jobs/{parent['id']}/report").json()["recommendations"][:2]
    assert sorted(c["remedy_id"] for c in children) == sorted(r["id"] for r in top)
    assert worker.run_once() is True and worker.run_once() is True  # children run first (priority -1)
    report = client.get(f"/v1/jobs/{parent['id']}/report").json()
    assert report["final"] is True and client.get(f"/v1/jobs/{parent['id']}").json()["report_final"] is True
    verified = [r["verification"] for r in report["recommendations"][:2]]
    assert {v["job_id"] for v in verified} == {c["id"] for c in children}
    for v in verified:
        assert set(v) >= {"job_id", "verdict", "final_loss", "baseline_final_loss", "improved"}
    assert verified[0]["verdict"] == "healthy" and verified[0]["improved"] is True
    assert report["recommendations"][2:] == [] or report["recommendations"][2]["verification"] is None
    assert worker.run_once() is False
