"""Examples and response descriptions for the OpenAPI document, so /docs reads as a manual.

Routers import these; nothing here runs at request time.
"""

from __future__ import annotations

from typing import Any

JOB_ID = "3f0c2a5e-8d1b-4c3e-9a57-0b6f4f1d2e11"

JOB_EXAMPLE: dict[str, Any] = {
    "id": JOB_ID,
    "name": "deep-sigmoid",
    "source": "spec",
    "status": "succeeded",
    "progress": {"epoch": 3, "epochs": 10},
    "verdict": "vanishing",
    "parent_id": None,
    "created_at": "2025-01-01T12:00:00.000000Z",
    "started_at": "2025-01-01T12:00:00.400000Z",
    "finished_at": "2025-01-01T12:00:05.100000Z",
    "error": None,
    "spec": {"name": "deep-sigmoid", "network": {"layers": ["..."]}, "data": {"name": "digits"},
             "training": {"optimizer": "sgd", "lr": 0.1, "batch_size": 64, "epochs": 10, "seed": 0}},
    "layers": None,
    "remedy_id": None,
    "attempts": 1,
    "worker_id": None,
    "cancel_requested": False,
    "report_final": True,
    "time_to_verdict_s": 4.2,
    "callback_url": "https://ci.example.com/hooks/gradwatch",
    "webhook": {"url": "https://ci.example.com/hooks/gradwatch", "status": "delivered", "attempts": 1,
                "last_status_code": 200, "last_error": None, "last_attempt_at": "2025-01-01T12:00:05.300000Z",
                "next_attempt_at": None, "delivered_at": "2025-01-01T12:00:05.300000Z"},
}

EXTERNAL_JOB_EXAMPLE: dict[str, Any] = {
    **JOB_EXAMPLE, "name": "my-run", "source": "external", "status": "running", "verdict": None,
    "progress": {"epoch": 0, "epochs": 10}, "finished_at": None, "spec": None, "report_final": False,
    "time_to_verdict_s": None,
    "layers": [{"name": "fc1", "type": "linear"}, {"name": "fc2", "type": "linear"}],
    "webhook": {**JOB_EXAMPLE["webhook"], "status": "waiting", "attempts": 0, "last_status_code": None,
                "last_attempt_at": None, "delivered_at": None},
}

EPOCH_RECORD_EXAMPLE: dict[str, Any] = {
    "epoch": 1, "loss": 2.29, "metrics": {"accuracy": 0.11}, "nonfinite": False,
    "layers": [{"name": "fc1", "type": "linear",
                "grad_norm": {"mean": 3.1e-09, "min": 2.2e-09, "max": 4.0e-09, "last": 2.9e-09},
                "grad_max_abs": 1.2e-10, "weight_norm": 5.6, "update_ratio": 1.0e-10, "nonfinite_grads": 0,
                "activation": {"mean": 0.5, "std": 0.01, "saturated_frac": 0.0, "dead_frac": 0.0}},
               {"name": "fc2", "type": "linear",
                "grad_norm": {"mean": 0.21, "min": 0.15, "max": 0.3, "last": 0.18},
                "grad_max_abs": 0.05, "weight_norm": 1.9, "update_ratio": 0.004, "nonfinite_grads": 0,
                "activation": None}],
    "temporal": None,
}

REPORT_EXAMPLE: dict[str, Any] = {
    "job_id": JOB_ID, "final": True, "verdict": "vanishing", "confidence": 0.97,
    "summary": "Vanishing: the first layer's gradient is 3.1e-09 of the last layer's in every epoch.",
    "findings": [{"kind": "vanishing_gradients", "severity": "high", "layers": ["layers.0.0.layers.0.linear"],
                  "epochs": [1, 3], "evidence": {"grad_norm_ratio_first_last": 3.1e-09},
                  "message": "The gradient reaching the first layers is ~1e-9 of the last layer's."}],
    "layers": [{"name": "layers.0.0.layers.0.linear", "verdict": "vanishing"}],
    "recommendations": [{"id": "use_relu_he_init", "priority": 1, "title": "Use ReLU with He initialisation",
                         "rationale": "Sigmoid derivatives are at most 0.25; ReLU passes gradients unchanged.",
                         "addresses": ["vanishing_gradients"],
                         "patch": [{"op": "replace", "path": "/network/layers/0/layers/1/type", "value": "relu"}],
                         "verification": None}],
}

DELIVERIES_EXAMPLE: dict[str, Any] = {"items": [
    {"id": 1, "delivery_id": "7d7c1f1e-3d4b-5a8e-9f7b-2f0b9a1c6d55", "event": "job.finished", "attempt": 1,
     "url": "https://ci.example.com/hooks/gradwatch", "state": "failed", "delivered": False, "status_code": 503,
     "error": "HTTP 503: Service Unavailable", "duration_ms": 12.5, "created_at": "2025-01-01T12:00:05.100000Z",
     "next_attempt_at": "2025-01-01T12:00:05.100000Z", "sent_at": "2025-01-01T12:00:05.150000Z"},
    {"id": 2, "delivery_id": "7d7c1f1e-3d4b-5a8e-9f7b-2f0b9a1c6d55", "event": "job.finished", "attempt": 2,
     "url": "https://ci.example.com/hooks/gradwatch", "state": "delivered", "delivered": True, "status_code": 200,
     "error": None, "duration_ms": 8.1, "created_at": "2025-01-01T12:00:05.160000Z",
     "next_attempt_at": "2025-01-01T12:00:07.150000Z", "sent_at": "2025-01-01T12:00:07.400000Z"},
]}

SECRET_EXAMPLE: dict[str, Any] = {
    "secret": "whsec_3q2-7wV1mZ0bq0cM4j5YtGx2xqkq7Qy9m1S0n5K8d2A",
    "algorithm": "HMAC-SHA256",
    "signature_header": "Gradwatch-Signature",
    "signature_format": "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f'{t}.{raw body}')>",
    "created_at": "2025-01-01T12:00:00Z",
    "rotated_at": None,
    "previous_secret_expires_at": None,
}


def problem_example(status: int, slug: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"urn:gradwatch:problem:{slug}", "title": title, "status": status, "detail": detail,
            "instance": f"/v1/jobs/{JOB_ID}", **extra}


def json_response(description: str, example: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"example": example}}}


def problem_response(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"example": example}}}


NOT_FOUND = problem_response(
    "No such job, or a job of another tenant (existence is not leaked).",
    problem_example(404, "not-found", "Not found", "No such job."),
)
FINISHED = problem_response(
    "The job already ended.",
    problem_example(409, "job-finished", "Job already finished", "The job is succeeded; it takes no more epochs."),
)
NOT_EXTERNAL = problem_response(
    "Only external jobs take this request.",
    problem_example(409, "not-external", "Not an external job", "Epochs of spec jobs are written by the workers."),
)
INVALID_SPEC = problem_response(
    "The spec cannot be built; every problem is named by JSON Pointer. Nothing was queued.",
    problem_example(422, "invalid-spec", "Invalid job spec", "/network/layers/1/type: unknown layer type 'relu6'",
                    errors=[{"pointer": "/network/layers/1/type", "detail": "unknown layer type 'relu6'"}]),
)
INVALID_EPOCH = problem_response(
    "A record is malformed; nothing of the request was stored.",
    problem_example(422, "invalid-epoch", "Invalid epoch record", "/1/epoch: Input should be greater than or equal to 1",
                    errors=[{"pointer": "/1/epoch", "detail": "Input should be greater than or equal to 1"}]),
)
