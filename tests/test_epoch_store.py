"""service.epoch_store on SQLite and PostgreSQL: the record shape round-trips exactly."""

from __future__ import annotations

import copy
import math

import pytest
from sqlalchemy import delete, func, select

from service import epoch_store, queue
from service.epoch_store import LAYER_FLOAT_FIELDS, record_to_rows
from service.tables import Epoch, Job, LayerStat

NAN, INF = float("nan"), float("inf")


def probe_record(epoch: int = 1) -> dict:
    """A record as gradwatch.Probe emits it: every extension field present."""
    return {
        "epoch": epoch,
        "loss": 0.71,
        "metrics": {"accuracy": 0.4, "mse": 1e-12},
        "nonfinite": False,
        "steps": 28,
        "sample_stride": 4,
        "loss_stats": {"first": 2.3, "last": 0.5, "min": 0.4, "max": 2.31},
        "layers": [
            {
                "name": "layers.0.linear",
                "type": "linear",
                "grad_norm": {"mean": 0.1, "min": 1e-300, "max": 3e300, "last": 0.2,
                              "first": 0.05, "median": 0.11},
                "grad_max_abs": 0.031,
                "weight_norm": 12.5,
                "update_ratio": 0.001,
                "nonfinite_grads": 0,
                "activation": {"mean": 0.5, "std": 0.2, "saturated_frac": 0.9,
                               "dead_frac": 0.0, "module": "layers.1.sigmoid"},
            },
            {
                "name": "layers.2.rnn",
                "type": "rnn",
                "grad_norm": {"mean": 1.0, "min": 0.0, "max": 2.0, "last": 1.5,
                              "first": 0.5, "median": None},
                "grad_max_abs": None,
                "weight_norm": 1.0,
                "update_ratio": None,
                "nonfinite_grads": 2,
                "activation": None,
            },
            {
                "name": "layers.3.linear",
                "type": "linear",
                "grad_norm": {"mean": 1.0, "min": 1.0, "max": 1.0, "last": 1.0,
                              "first": 1.0, "median": 1.0},
                "grad_max_abs": 1.0,
                "weight_norm": 1.0,
                "update_ratio": 0.5,
                "nonfinite_grads": 0,
                # present but empty: must not come back as null
                "activation": {"mean": None, "std": None, "saturated_frac": None,
                               "dead_frac": None, "module": None},
            },
        ],
        "temporal": {"layer": "layers.2.rnn", "wrt": "hidden",
                     "grad_norm_by_step": [1e-8, 1e-4, 0.5, None]},
    }


def new_job(db, source="spec") -> str:
    with db.session() as s:
        if source == "external":
            return queue.enqueue(s, tenant="t", name="ext", spec=None, epochs_total=None,
                                 source="external", status="running").id
        return queue.enqueue(s, tenant="t", name="j", spec={}, epochs_total=3).id


def load(db, job_id, **kwargs):
    with db.session() as s:
        return epoch_store.load_records(s, job_id, **kwargs)


def test_probe_record_round_trips_exactly(database):
    job_id = new_job(database)
    records = [probe_record(1), probe_record(2)]
    original = copy.deepcopy(records)
    with database.session() as s:
        for r in records:
            assert epoch_store.write_record(s, job_id, 1, r) == r["epoch"]
    assert records == original  # inputs not modified
    loaded = load(database, job_id)
    assert loaded == original
    assert list(loaded[0]) == ["epoch", "loss", "metrics", "nonfinite", "steps", "sample_stride",
                               "loss_stats", "layers", "temporal"]
    assert loaded[0]["layers"][0]["grad_norm"]["min"] == 1e-300  # double precision kept


def test_contract_record_gains_null_extension_fields(database):
    job_id = new_job(database)
    record = {"epoch": 1, "loss": 0.5, "metrics": {"accuracy": 0.93}, "nonfinite": False,
              "layers": [{"name": "fc", "type": "linear",
                          "grad_norm": {"mean": 1.0, "min": 0.5, "max": 2.0, "last": 1.0},
                          "grad_max_abs": 0.1, "weight_norm": 3.0, "update_ratio": 0.01,
                          "nonfinite_grads": 0,
                          "activation": {"mean": 0.1, "std": 0.2, "saturated_frac": 0.0,
                                         "dead_frac": 0.3}}],
              "temporal": None}
    with database.session() as s:
        epoch_store.write_record(s, job_id, 1, record)
    (loaded,) = load(database, job_id)
    assert (loaded["steps"], loaded["sample_stride"], loaded["loss_stats"]) == (None, None, None)
    layer = loaded["layers"][0]
    assert layer["grad_norm"] == {"mean": 1.0, "min": 0.5, "max": 2.0, "last": 1.0,
                                  "first": None, "median": None}
    assert layer["activation"] == {"mean": 0.1, "std": 0.2, "saturated_frac": 0.0,
                                   "dead_frac": 0.3, "module": None}
    for key in ("epoch", "loss", "metrics", "nonfinite", "temporal"):
        assert loaded[key] == record[key]


def test_nonfinite_numbers_come_back_as_null_and_are_flagged(database):
    job_id = new_job(database)
    record = probe_record(1)
    record["loss"] = NAN
    record["metrics"] = {"accuracy": 0.1, "mse": INF}
    record["loss_stats"]["max"] = INF
    record["temporal"]["grad_norm_by_step"] = [1.0, NAN, -INF]
    layer = record["layers"][0]
    layer["grad_norm"]["max"] = INF
    layer["weight_norm"] = NAN
    layer["activation"]["std"] = -INF
    with database.session() as s:
        epoch_store.write_record(s, job_id, 1, record)
    (loaded,) = load(database, job_id)
    assert loaded["loss"] is None and loaded["nonfinite"] is True  # NaN loss implies nonfinite
    assert loaded["metrics"] == {"accuracy": 0.1, "mse": None}
    assert loaded["loss_stats"]["max"] is None
    assert loaded["temporal"]["grad_norm_by_step"] == [1.0, None, None]
    out = loaded["layers"][0]
    assert out["grad_norm"]["max"] is None and out["weight_norm"] is None
    assert out["activation"]["std"] is None and out["activation"]["mean"] == 0.5
    with database.session() as s:
        epoch_row = s.scalars(select(Epoch).where(Epoch.job_id == job_id)).one()
        masks = s.scalars(
            select(LayerStat.nonfinite_mask).where(LayerStat.job_id == job_id)
            .order_by(LayerStat.position)
        ).all()
    assert epoch_row.loss is None and epoch_row.nonfinite_mask == 1
    expected = sum(1 << LAYER_FLOAT_FIELDS.index(f) for f in ("grad_norm_max", "weight_norm", "act_std"))
    # layer 1 has nulls that were sent as null (not non-finite): no bits
    assert masks == [expected, 0, 0]


def test_record_to_rows_flags_and_validates():
    epoch_row, layers = record_to_rows("j", 2, {"epoch": 3.0, "loss": "nan", "layers": []})
    assert (epoch_row["epoch"], epoch_row["attempt"], epoch_row["loss"]) == (3, 2, None)
    assert epoch_row["nonfinite"] is True and epoch_row["nonfinite_mask"] == 1 and layers == []
    assert epoch_row["metrics"] == {} and epoch_row["extra"] is None
    bad = [
        {"loss": 1.0},
        {"epoch": 1.5},
        {"epoch": 1, "loss": "abc"},
        {"epoch": 1, "loss": True},
        {"epoch": 1, "layers": [{"type": "linear"}]},
        {"epoch": 1, "layers": [{"name": "x", "type": "linear", "grad_norm": {"mean": []}}]},
        {"epoch": 1, "layers": "nope"},
        {"epoch": 1, "metrics": [1]},
        {"epoch": 1, "layers": [{"name": "x" * 513, "type": "linear"}]},
        ["not", "a", "record"],
    ]
    for record in bad:
        with pytest.raises(ValueError):
            record_to_rows("j", 1, record)


def test_rewriting_an_epoch_replaces_it(database):
    job_id = new_job(database)
    with database.session() as s:
        epoch_store.write_record(s, job_id, 1, probe_record(1))
        epoch_store.write_record(s, job_id, 1, probe_record(2))
    smaller = probe_record(1)
    smaller["loss"] = 0.1
    smaller["layers"] = smaller["layers"][:1]
    with database.session() as s:
        epoch_store.write_record(s, job_id, 2, smaller)
    loaded = load(database, job_id)
    assert [(r["epoch"], r["loss"], len(r["layers"])) for r in loaded] == [(1, 0.1, 1), (2, 0.71, 3)]
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(LayerStat)) == 4


def test_load_orders_records_and_layers_and_filters_since(database):
    job_id, other = new_job(database), new_job(database)
    with database.session() as s:
        for e in (3, 1, 2):
            epoch_store.write_record(s, job_id, 1, probe_record(e))
        epoch_store.write_record(s, other, 1, probe_record(1))
    loaded = load(database, job_id)
    assert [r["epoch"] for r in loaded] == [1, 2, 3]
    assert [layer["name"] for layer in loaded[0]["layers"]] == [
        "layers.0.linear", "layers.2.rnn", "layers.3.linear"]
    assert [r["epoch"] for r in load(database, job_id, since_epoch=1)] == [2, 3]
    assert load(database, job_id, since_epoch=3) == []
    assert load(database, "no-such-job") == []


def test_external_upserts_are_idempotent(database):
    job_id = new_job(database, source="external")
    batch = [probe_record(1), probe_record(2)]
    for _ in range(2):  # a retried POST
        with database.session() as s:
            assert epoch_store.upsert_external(s, job_id, batch) == [1, 2]
    with database.session() as s:
        assert epoch_store.upsert_external(s, job_id, [probe_record(1)]) == [1]  # late resend
        assert epoch_store.upsert_external(s, job_id, []) == []
    with database.session() as s:
        assert s.get(Job, job_id).epochs_done == 2
        assert s.scalar(select(func.count()).select_from(Epoch)) == 2
        assert s.scalar(select(func.count()).select_from(LayerStat)) == 6
    assert load(database, job_id) == batch


def test_external_upsert_last_record_of_an_epoch_wins(database):
    job_id = new_job(database, source="external")
    second = probe_record(1)
    second["loss"] = 0.25
    with database.session() as s:
        assert epoch_store.upsert_external(s, job_id, [probe_record(1), second]) == [1]
    assert [r["loss"] for r in load(database, job_id)] == [0.25]


def test_external_upsert_refuses_jobs_that_take_no_epochs(database):
    spec_job = new_job(database)
    finished = new_job(database, source="external")
    with database.session() as s:
        queue.request_cancel(s, finished, "t")
    with database.session() as s:
        assert epoch_store.upsert_external(s, spec_job, [probe_record(1)]) is None
        assert epoch_store.upsert_external(s, finished, [probe_record(1)]) is None
        assert epoch_store.upsert_external(s, "no-such-job", [probe_record(1)]) is None
        assert epoch_store.upsert_external(s, finished, []) is None
    assert load(database, spec_job) == [] and load(database, finished) == []


def test_external_upsert_writes_nothing_from_a_bad_batch(database):
    job_id = new_job(database, source="external")
    with pytest.raises(ValueError):
        with database.session() as s:
            epoch_store.upsert_external(s, job_id, [probe_record(1), {"epoch": "x"}])
    assert load(database, job_id) == []


def test_deleting_a_job_deletes_its_epochs(database):
    job_id = new_job(database)
    with database.session() as s:
        epoch_store.write_record(s, job_id, 1, probe_record(1))
    with database.session() as s:
        s.execute(delete(Job).where(Job.id == job_id))
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(Epoch)) == 0
        assert s.scalar(select(func.count()).select_from(LayerStat)) == 0


def test_many_layers_are_written_in_bulk(database):
    job_id = new_job(database)
    record = probe_record(1)
    layer = record["layers"][0]
    record["layers"] = [dict(layer, name=f"layers.{i}.linear") for i in range(2000)]
    with database.session() as s:
        epoch_store.write_record(s, job_id, 1, record)
    (loaded,) = load(database, job_id)
    assert len(loaded["layers"]) == 2000
    assert loaded["layers"][1999]["name"] == "layers.1999.linear"
    assert math.isclose(loaded["layers"][5]["weight_norm"], 12.5)
