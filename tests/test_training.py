"""models.training: tiny real trainings (each well under a second)."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from models.diagnosis import diagnose
from models.training import make_loss, make_optimizer, resolve_device, train
from models.validation import Limits, check_spec

torch.set_num_threads(1)


def spec(layers=None, data=None, **training):
    tr = {"optimizer": "adam", "lr": 0.01, "batch_size": 32, "epochs": 3, "seed": 0}
    tr.update(training)
    raw = {"name": "t", "network": {"layers": layers or [
        {"type": "linear", "out_features": 16}, {"type": "relu"}, {"type": "linear", "out_features": 2}]},
        "data": data or {"name": "spirals", "n_samples": 200, "seed": 0},
        "training": tr, "analysis": {"early_stop": True, "verify_remedies": 0}}
    return check_spec(raw, Limits())


def test_records_metrics_and_callbacks():
    seen = []
    res = train(spec(), on_epoch=seen.append, device="cpu", threads=1)
    assert res.stopped == "completed"
    assert [r["epoch"] for r in res.records] == [1, 2, 3] and seen == res.records
    r = res.records[-1]
    assert set(r["metrics"]) >= {"accuracy"} and 0 <= r["metrics"]["accuracy"] <= 1
    assert r["metrics"]["chance_accuracy"] == 0.5
    assert r["steps"] == math.ceil(200 / 32)
    assert r["sample_stride"] == 16   # the service's short epochs: denser than the SDK default
    assert [l["name"] for l in r["layers"]] == ["layers.0.linear", "layers.2.linear"]
    assert res.final_loss == pytest.approx(r["loss"])
    assert res.time_to_verdict_s > 0 and len(res.epoch_times) == 3


def test_deterministic_from_seed():
    a = train(spec(), device="cpu").records
    b = train(spec(), device="cpu").records
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    c = train(spec(seed=1), device="cpu").records
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


def test_regression_metrics_and_losses():
    s = spec(layers=[{"type": "linear", "out_features": 8}, {"type": "tanh"}, {"type": "linear", "out_features": 2}],
             data={"name": "teacher", "features": 4, "outputs": 2, "n_samples": 128}, loss="smooth_l1",
             optimizer={"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4})
    res = train(s, device="cpu")
    m = res.records[-1]["metrics"]
    assert set(m) >= {"mse", "target_variance"} and m["target_variance"] > 0


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw", "rmsprop",
                                 {"name": "adamw", "betas": [0.8, 0.99], "weight_decay": 0.1},
                                 {"name": "rmsprop", "momentum": 0.5}])
def test_optimizers(opt):
    res = train(spec(optimizer=opt, epochs=1), device="cpu")
    assert res.records[0]["loss"] is not None


def test_optimizer_options_reach_torch():
    p = [torch.nn.Parameter(torch.zeros(2))]
    o = make_optimizer(p, {"name": "sgd", "momentum": 0.9, "weight_decay": 0.1}, 0.5)
    assert isinstance(o, torch.optim.SGD) and o.defaults["momentum"] == 0.9 and o.defaults["weight_decay"] == 0.1
    o = make_optimizer(p, {"name": "adam", "betas": [0.5, 0.9]}, 0.1)
    assert o.defaults["betas"] == (0.5, 0.9)


def test_loss_names():
    out = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    assert make_loss("auto", "classification", 3)(out, y) > 0
    assert make_loss("mse", "classification", 3)(out, y) > 0  # one-hot targets
    assert make_loss("l1", "regression", 3)(out, torch.randn(4, 3)) > 0
    with pytest.raises(ValueError):
        make_loss("nope", "regression", 1)


def test_divergence_is_data_and_stops_early():
    s = spec(layers=[{"type": "linear", "out_features": 32, "init": {"name": "normal", "std": 20.0}}, {"type": "relu"},
                     {"type": "linear", "out_features": 2, "init": {"name": "normal", "std": 20.0}}],
             optimizer="sgd", lr=1e6, epochs=20)
    res = train(s, device="cpu", early_stop=True)
    assert res.stopped == "early_stop" and len(res.records) == 1
    assert diagnose(res.records, final=True)["verdict"] == "exploding"
    full = train(s, device="cpu", early_stop=False)  # never raises, records say so
    assert full.stopped == "completed" and len(full.records) == 20
    assert any(r["nonfinite"] for r in full.records)
    assert full.records[-1]["loss"] is None and full.final_loss is None


def test_early_stop_on_vanishing_pattern():
    s = spec(layers=[{"type": "repeat", "times": 12, "layers": [
        {"type": "linear", "out_features": 32, "init": {"name": "normal", "std": 0.02}}, {"type": "sigmoid"}]},
        {"type": "linear", "out_features": 2}], optimizer="sgd", lr=0.01, epochs=10)
    res = train(s, device="cpu")
    assert res.stopped == "early_stop" and len(res.records) < 10


def test_cancel_stops_within_a_step():
    ev = threading.Event()
    s = spec(epochs=1000, batch_size=1)
    threading.Timer(0.3, ev.set).start()
    t0 = time.perf_counter()
    res = train(s, should_stop=ev.is_set, device="cpu")
    assert res.stopped == "cancelled"
    assert time.perf_counter() - t0 < 2.0


def test_clipping_options():
    for clip in ({"max_norm": 0.1}, {"max_value": 0.01}):
        res = train(spec(grad_clip=clip, epochs=1), device="cpu")
        assert res.records[0]["loss"] is not None


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto", "cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
