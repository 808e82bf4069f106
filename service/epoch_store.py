"""Epoch records <-> rows of ``epochs`` and ``layer_stats``.

The record shape is docs/architecture.md's "Epoch record" (the contract's record plus the
extension fields ``steps``, ``sample_stride``, ``loss_stats``, ``grad_norm.first/median`` and
``activation.module``). ``load_records`` returns exactly that shape, every key always present:
an extension field the writer did not send comes back as null (the contract allows new
optional fields; it never removes one).

Non-finite numbers (MLflow-style, but returned as null as the contract requires): a float
statistic that is NaN/+Inf/-Inf is stored as SQL NULL with its bit set in the row's
``nonfinite_mask`` (bit i = ``EPOCH_FLOAT_FIELDS[i]`` / ``LAYER_FLOAT_FIELDS[i]``), so "was not
finite" and "was not sent" stay distinguishable in SQL. A record whose ``loss`` is NaN/Inf is
stored with ``nonfinite`` true. Non-finite numbers inside JSON values (metrics, temporal,
loss_stats) become null.

Writes are bulk: one statement for the epoch rows, one executemany for their layer rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, insert, select, update
from sqlalchemy.orm import Session

from service.tables import Epoch, Job, LayerStat, utcnow

EPOCH_FLOAT_FIELDS: tuple[str, ...] = ("loss",)
LAYER_FLOAT_FIELDS: tuple[str, ...] = (
    "grad_norm_mean",
    "grad_norm_min",
    "grad_norm_max",
    "grad_norm_last",
    "grad_norm_first",
    "grad_norm_median",
    "grad_max_abs",
    "weight_norm",
    "update_ratio",
    "act_mean",
    "act_std",
    "act_saturated_frac",
    "act_dead_frac",
)
GRAD_NORM_KEYS = ("mean", "min", "max", "last", "first", "median")
ACTIVATION_KEYS = ("mean", "std", "saturated_frac", "dead_frac")
EXTRA_KEYS = ("steps", "sample_stride", "loss_stats")

_epoch_table = Epoch.__table__
_layer_table = LayerStat.__table__
_NAME_MAX = _layer_table.c.name.type.length
_TYPE_MAX = _layer_table.c.type.type.length


def _float(value: Any, where: str) -> tuple[float | None, bool]:
    """(value as a finite float or None, whether it was NaN/Inf)."""
    if value is None:
        return None, False
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if math.isfinite(number):
        return number, False
    return None, True


def _int(value: Any, where: str, *, default: int | None = None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected an integer, got {value!r}") from None


def _json(value: Any) -> Any:
    """A JSON value with NaN/Inf replaced by null (tuples become lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def record_to_rows(
    job_id: str, attempt: int, record: Mapping[str, Any], *, now: datetime | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One epoch record -> (kwargs of its ``epochs`` row, [kwargs of its ``layer_stats`` rows]).

    Raises ValueError (naming the field) when the record is malformed.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"an epoch record must be an object, got {type(record).__name__}")
    epoch = _int(record.get("epoch"), "epoch")
    if epoch is None:
        raise ValueError("epoch: required")
    loss, loss_nonfinite = _float(record.get("loss"), "loss")
    metrics = record.get("metrics")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise ValueError("metrics: expected an object")
    temporal = record.get("temporal")
    if temporal is not None and not isinstance(temporal, Mapping):
        raise ValueError("temporal: expected an object or null")
    extra = {key: _json(record.get(key)) for key in EXTRA_KEYS if record.get(key) is not None}

    epoch_row: dict[str, Any] = {
        "job_id": job_id,
        "epoch": epoch,
        "attempt": attempt,
        "loss": loss,
        "nonfinite": bool(record.get("nonfinite")) or loss_nonfinite,
        "metrics": _json(metrics) if metrics is not None else {},
        "temporal": _json(temporal) if temporal is not None else None,
        "extra": extra or None,
        "nonfinite_mask": 1 if loss_nonfinite else 0,
        "created_at": now or utcnow(),
    }

    layers = record.get("layers") or []
    if not isinstance(layers, (list, tuple)):
        raise ValueError("layers: expected a list")
    layer_rows: list[dict[str, Any]] = []
    for position, layer in enumerate(layers):
        where = f"layers/{position}"
        if not isinstance(layer, Mapping):
            raise ValueError(f"{where}: expected an object")
        name, type_ = layer.get("name"), layer.get("type")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}/name: required")
        if not isinstance(type_, str) or not type_:
            raise ValueError(f"{where}/type: required")
        if len(name) > _NAME_MAX or len(type_) > _TYPE_MAX:
            raise ValueError(
                f"{where}: name is limited to {_NAME_MAX} characters and type to {_TYPE_MAX}"
            )
        grad_norm = layer.get("grad_norm") or {}
        activation = layer.get("activation")
        if not isinstance(grad_norm, Mapping):
            raise ValueError(f"{where}/grad_norm: expected an object")
        if activation is not None and not isinstance(activation, Mapping):
            raise ValueError(f"{where}/activation: expected an object or null")
        raw = {f"grad_norm_{k}": grad_norm.get(k) for k in GRAD_NORM_KEYS}
        raw["grad_max_abs"] = layer.get("grad_max_abs")
        raw["weight_norm"] = layer.get("weight_norm")
        raw["update_ratio"] = layer.get("update_ratio")
        for key in ACTIVATION_KEYS:
            raw[f"act_{key}"] = activation.get(key) if activation is not None else None
        row: dict[str, Any] = {
            "job_id": job_id,
            "epoch": epoch,
            "position": position,
            "name": name,
            "type": type_,
        }
        mask = 0
        for bit, field in enumerate(LAYER_FLOAT_FIELDS):
            value, nonfinite = _float(raw[field], f"{where}/{field}")
            row[field] = value
            if nonfinite:
                mask |= 1 << bit
        module = activation.get("module") if activation is not None else None
        row["nonfinite_grads"] = _int(
            layer.get("nonfinite_grads"), f"{where}/nonfinite_grads", default=0
        )
        row["has_activation"] = activation is not None
        row["act_module"] = str(module)[:_NAME_MAX] if module is not None else None
        row["nonfinite_mask"] = mask
        layer_rows.append(row)
    return epoch_row, layer_rows


def _epoch_to_record(row: Any, layers: list[dict[str, Any]]) -> dict[str, Any]:
    extra = row.extra or {}
    return {
        "epoch": row.epoch,
        "loss": row.loss,
        "metrics": row.metrics if row.metrics is not None else {},
        "nonfinite": bool(row.nonfinite),
        "steps": extra.get("steps"),
        "sample_stride": extra.get("sample_stride"),
        "loss_stats": extra.get("loss_stats"),
        "layers": layers,
        "temporal": row.temporal,
    }


def _layer_to_dict(row: Any) -> dict[str, Any]:
    activation = None
    if row.has_activation:
        activation = {
            "mean": row.act_mean,
            "std": row.act_std,
            "saturated_frac": row.act_saturated_frac,
            "dead_frac": row.act_dead_frac,
            "module": row.act_module,
        }
    return {
        "name": row.name,
        "type": row.type,
        "grad_norm": {
            "mean": row.grad_norm_mean,
            "min": row.grad_norm_min,
            "max": row.grad_norm_max,
            "last": row.grad_norm_last,
            "first": row.grad_norm_first,
            "median": row.grad_norm_median,
        },
        "grad_max_abs": row.grad_max_abs,
        "weight_norm": row.weight_norm,
        "update_ratio": row.update_ratio,
        "nonfinite_grads": row.nonfinite_grads,
        "activation": activation,
    }


def replace_rows(
    session: Session, job_id: str, rows: list[tuple[dict[str, Any], list[dict[str, Any]]]]
) -> None:
    """Replace the given epochs of ``job_id`` with ``rows`` (from record_to_rows): delete what is
    stored for those epochs, then one insert for the epoch rows and one executemany for the layers."""
    epochs = [epoch_row["epoch"] for epoch_row, _ in rows]
    session.execute(
        delete(_layer_table).where(_layer_table.c.job_id == job_id, _layer_table.c.epoch.in_(epochs))
    )
    session.execute(
        delete(_epoch_table).where(_epoch_table.c.job_id == job_id, _epoch_table.c.epoch.in_(epochs))
    )
    session.execute(insert(_epoch_table), [epoch_row for epoch_row, _ in rows])
    layer_rows = [layer_row for _, layers in rows for layer_row in layers]
    if layer_rows:
        session.execute(insert(_layer_table), layer_rows)


def write_record(session: Session, job_id: str, attempt: int, record: Mapping[str, Any]) -> int:
    """Store one epoch record of ``job_id`` (replacing a stored record of the same epoch).

    Returns the epoch number. Does not touch ``jobs``: callers fence first (queue.write_epoch).
    """
    epoch_row, layer_rows = record_to_rows(job_id, attempt, record)
    replace_rows(session, job_id, [(epoch_row, layer_rows)])
    return epoch_row["epoch"]


def upsert_external(
    session: Session, job_id: str, records: Iterable[Mapping[str, Any]]
) -> list[int] | None:
    """Store epoch records posted for an external job; idempotent on (job, epoch).

    A record for an epoch that is already stored replaces it (a retried POST never duplicates;
    within one call the last record of an epoch wins). ``jobs.epochs_done`` becomes the highest
    epoch stored. Returns the epochs written, or None (nothing written) when the job does not
    exist, is not external or is no longer running. Raises ValueError for a malformed record
    before anything is written.
    """
    now = utcnow()
    by_epoch: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for record in records:
        epoch_row, layer_rows = record_to_rows(job_id, 0, record, now=now)
        by_epoch[epoch_row["epoch"]] = (epoch_row, layer_rows)
    if not by_epoch:
        found = session.execute(
            select(Job.id).where(Job.id == job_id, Job.source == "external", Job.status == "running")
        ).first()
        return [] if found else None
    highest = max(by_epoch)
    # Updating the job row first takes its lock (the write lock on SQLite), so concurrent posts
    # for one job queue up instead of colliding on the (job_id, epoch) unique constraint.
    touched = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.source == "external", Job.status == "running")
        .values(
            epochs_done=case((Job.epochs_done < highest, highest), else_=Job.epochs_done),
            heartbeat_at=now,
            updated_at=now,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    if touched is None:
        return None
    replace_rows(session, job_id, [by_epoch[e] for e in sorted(by_epoch)])
    return sorted(by_epoch)


def load_records(
    session: Session, job_id: str, *, since_epoch: int | None = None
) -> list[dict[str, Any]]:
    """The stored epoch records of ``job_id``, oldest first, layers in their order.

    ``since_epoch``: only records with ``epoch > since_epoch`` (for polling).
    """
    epoch_query = select(_epoch_table).where(_epoch_table.c.job_id == job_id)
    layer_query = select(_layer_table).where(_layer_table.c.job_id == job_id)
    if since_epoch is not None:
        epoch_query = epoch_query.where(_epoch_table.c.epoch > since_epoch)
        layer_query = layer_query.where(_layer_table.c.epoch > since_epoch)
    epoch_rows = session.execute(epoch_query.order_by(_epoch_table.c.epoch)).all()
    if not epoch_rows:
        return []
    layers: dict[int, list[dict[str, Any]]] = {row.epoch: [] for row in epoch_rows}
    for row in session.execute(
        layer_query.order_by(_layer_table.c.epoch, _layer_table.c.position)
    ):
        bucket = layers.get(row.epoch)
        if bucket is not None:
            bucket.append(_layer_to_dict(row))
    return [_epoch_to_record(row, layers[row.epoch]) for row in epoch_rows]
