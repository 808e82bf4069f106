"""models.diagnosis: synthetic epoch records for every rule, plus a few tiny real trainings."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from models.diagnosis import analyse, autotrainer_verdict, diagnose, verdict_is_certain
from models.thresholds import DEFAULTS, THRESHOLDS, resolve

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ synthetic records
def layer(name, type_="linear", g=1.0, g_first=None, w=5.0, act=None, nonfinite=0, gmax=None):
    return {"name": name, "type": type_,
            "grad_norm": {"mean": g, "min": g, "max": g if gmax is None else gmax, "last": g,
                          "first": g if g_first is None else g_first, "median": g},
            "grad_max_abs": g, "weight_norm": w, "update_ratio": 0.01,
            "nonfinite_grads": nonfinite, "activation": act}


def record(epoch, loss, layers, *, metrics=None, first=None, lmax=None, temporal=None, nonfinite=False):
    return {"epoch": epoch, "loss": loss, "metrics": metrics or {}, "nonfinite": nonfinite,
            "steps": 20, "sample_stride": 8,
            "loss_stats": {"first": first if first is not None else loss, "last": loss,
                           "min": loss, "max": lmax if lmax is not None else loss},
            "layers": layers, "temporal": temporal}


def mlp(gs, w=5.0, first=None, act=None):
    """layers with grad norms gs (first .. last)."""
    return [layer(f"layers.{i}.linear", g=g, g_first=(first[i] if first else None), w=w, act=act)
            for i, g in enumerate(gs)]


def acc(a):
    return {"accuracy": a, "chance_accuracy": 0.1}


def healthy_run(epochs=5):
    out = []
    for e in range(1, epochs + 1):
        out.append(record(e, 2.3 / e, mlp([0.3, 0.5, 1.0]), metrics=acc(0.5 + 0.09 * e),
                          first=2.3 if e == 1 else None))
    return out


def vanishing_run(epochs=4, ratio=1e-7):
    return [record(e, 2.30, mlp([ratio, 1e-3, 1.0], first=[ratio, 1e-3, 1.0]), metrics=acc(0.1),
                   first=2.3) for e in range(1, epochs + 1)]


# ------------------------------------------------------------------ verdicts
def test_healthy():
    rep = diagnose(healthy_run(), final=True)
    assert rep["verdict"] == "healthy"
    assert rep["findings"] == [] and rep["recommendations"] == []
    assert {l["verdict"] for l in rep["layers"]} == {"healthy"}
    assert 0.5 <= rep["confidence"] <= 1


def test_vanishing_by_ratio():
    rep = diagnose(vanishing_run(), final=True)
    assert rep["verdict"] == "vanishing"
    f = rep["findings"][0]
    assert f["kind"] == "vanishing_gradients" and f["severity"] == "high"
    assert f["epochs"] == [1, 4]
    assert f["evidence"]["grad_norm_ratio_first_last"] == pytest.approx(1e-7)
    assert "layers.0.linear" in f["layers"]
    layers = {l["name"]: l["verdict"] for l in rep["layers"]}
    assert layers["layers.0.linear"] == "vanishing" and layers["layers.2.linear"] == "healthy"
    # external job: code, no patch
    assert rep["recommendations"] and all(r["patch"] is None and r["code"] for r in rep["recommendations"])


def test_small_ratio_but_learning_is_not_vanishing():
    recs = [record(e, 2.3 / e, mlp([1e-6, 1e-3, 1.0]), metrics=acc(0.9), first=2.3) for e in range(1, 5)]
    assert diagnose(recs, final=True)["verdict"] == "healthy"


def test_ratio_small_at_init_only_is_not_vanishing():
    # tanh/sigmoid nets: first layer 10-500x smaller at init, then normal (benchmark cases 09/12)
    recs = [record(e, 2.3, mlp([1e-2, 0.3, 1.0], first=[1e-2, 0.3, 1.0]), metrics=acc(0.1), first=2.3)
            for e in range(1, 4)]
    assert diagnose(recs, final=True)["verdict"] == "healthy"


def test_blind_spot_whole_network_collapse():
    # deep ReLU, weight variance 1/n, no biases: ratio ~1 while every gradient is ~1e-5
    recs = [record(e, 2.3026, mlp([2e-5, 1.5e-5, 1e-5], w=8.0), metrics=acc(0.1), first=2.3026)
            for e in range(1, 4)]
    a = analyse(recs)
    assert a.ratios[0] == pytest.approx(2.0)
    rep = diagnose(recs, final=True)
    assert rep["verdict"] == "vanishing"
    f = rep["findings"][0]
    assert f["kind"] == "vanishing_gradients"
    assert f["evidence"]["max_loss_sensitivity"] < DEFAULTS["collapse_sensitivity"]
    assert autotrainer_verdict(recs) == "healthy"  # the published rule misses it
    # early stop: a collapse with a normal ratio is only certain once the weights stop moving
    assert not verdict_is_certain(recs)  # update_ratio 1e-2
    for r in recs:
        for l in r["layers"]:
            l["update_ratio"] = 1e-5
    assert verdict_is_certain(recs)


def test_nonfinite_is_exploding():
    recs = healthy_run(2) + [record(3, None, mlp([None, None, None]), nonfinite=True, metrics=acc(0.1))]
    recs[-1]["layers"][0]["nonfinite_grads"] = 3
    rep = diagnose(recs, final=True)
    assert rep["verdict"] == "exploding"
    kinds = [f["kind"] for f in rep["findings"]]
    assert kinds[0] == "nonfinite_loss" and "exploding_gradients" in kinds
    assert verdict_is_certain(recs)


def test_loss_divergence_finite():
    recs = [record(1, 1.5e4, mlp([1.0, 1.0, 1.0]), metrics=acc(0.6), first=0.7, lmax=5e5),
            record(2, 0.9, mlp([1.0, 1.0, 1.0]), metrics=acc(0.6))]
    rep = diagnose(recs, final=True)
    assert rep["verdict"] == "exploding"
    assert rep["findings"][0]["kind"] == "loss_divergence"
    assert rep["recommendations"][0]["id"] == "lower_learning_rate"
    assert verdict_is_certain(recs[:1])


def test_temporal_exploding_and_vanishing():
    def rnn_run(step_ratio, loss, m):
        recs = []
        for e in range(1, 4):
            t = {"layer": "layers.0.rnn.rnn", "wrt": "hidden", "grad_norm_by_step": [step_ratio, 1.0, 1.0]}
            recs.append(record(e, loss, [layer("layers.0.rnn.rnn", "rnn", g=1.0),
                                         layer("layers.1.linear", g=1.0)],
                               metrics=m, first=loss, temporal=t))
        return recs
    bad_fit = {"mse": 0.17, "target_variance": 0.167}
    rep = diagnose(rnn_run(1e9, 1e10, bad_fit), final=True)
    assert rep["verdict"] == "exploding"
    assert rep["findings"][0]["evidence"]["temporal_ratio_first_last_step"] == pytest.approx(1e9)
    rep = diagnose(rnn_run(1e-9, 0.17, bad_fit), final=True)
    assert rep["verdict"] == "vanishing"
    assert rep["layers"][0]["verdict"] == "vanishing"
    good_fit = {"mse": 0.01, "target_variance": 0.167}
    assert diagnose(rnn_run(5e-3, 0.17, good_fit), final=True)["verdict"] == "healthy"


def test_gradient_through_time_that_collapses_during_training_is_vanishing():
    """Fine at initialisation, vanished in every later epoch, nothing learned: vanishing (an
    orthogonal vanilla RNN on a 60-step adding problem does exactly this)."""
    def run(ratios, m):
        recs = []
        for e, r in enumerate(ratios, start=1):
            t = {"layer": "layers.0.rnn", "wrt": "hidden", "grad_norm_by_step": [r, 1.0]}
            recs.append(record(e, 0.17, [layer("layers.0.rnn", "rnn"), layer("layers.1.linear")],
                               metrics=m, first=0.17, temporal=t))
        return recs
    no_fit = {"mse": 0.168, "target_variance": 0.167}
    rep = diagnose(run([1.4e-3, 5e-17, 2e-13, 5e-12], no_fit), final=True)
    assert rep["verdict"] == "vanishing"
    assert "collapsed during training" in rep["findings"][0]["message"]
    assert rep["recommendations"] and rep["layers"][0]["verdict"] == "vanishing"
    assert not verdict_is_certain(run([1.4e-3, 5e-17, 2e-13, 5e-12], no_fit))  # may still recover
    # the same collapse in a model that learns is not vanishing, nor is a collapse in one epoch only
    assert diagnose(run([1.4e-3, 5e-17, 2e-13, 5e-12], {"mse": 0.01, "target_variance": 0.167}),
                    final=True)["verdict"] == "healthy"
    assert diagnose(run([1.4e-3, 5e-17, 2e-2, 3e-2], no_fit), final=True)["verdict"] == "healthy"


def test_exact_zero_first_layer_gradient_and_symmetry():
    spec = {"network": {"layers": [{"type": "linear", "out_features": 8, "init": "zeros"},
                                   {"type": "relu"}, {"type": "linear", "out_features": 2, "init": "zeros"}]},
            "data": {"name": "spirals"}}
    recs = [record(e, 0.69, [layer("layers.0.linear", g=0.0, w=0.0, gmax=0.0),
                             layer("layers.2.linear", g=0.3, w=0.0)],
                   metrics={"accuracy": 0.5, "chance_accuracy": 0.5}, first=0.69) for e in (1, 2, 3)]
    rep = diagnose(recs, spec=None, final=True)
    kinds = {f["kind"] for f in rep["findings"]}
    assert rep["verdict"] == "vanishing"
    assert {"vanishing_gradients", "symmetric_weights", "loss_plateau"} <= kinds
    assert rep["recommendations"][0]["id"] == "break_symmetry"


def test_saturation_and_dead_relu_findings():
    sat = {"mean": 0.5, "std": 0.45, "saturated_frac": 0.8, "dead_frac": 0.0, "module": "layers.1.sigmoid"}
    dead = {"mean": 0.0, "std": 0.0, "saturated_frac": 0.0, "dead_frac": 0.97, "module": "layers.3.relu"}
    recs = [record(e, 2.3 / e, [layer("layers.0.linear", g=0.3, act=sat), layer("layers.2.linear", g=0.5, act=dead),
                                layer("layers.4.linear", g=1.0)], metrics=acc(0.9), first=2.3)
            for e in (1, 2, 3)]
    rep = diagnose(recs, final=True)
    kinds = {f["kind"]: f for f in rep["findings"]}
    assert rep["verdict"] == "healthy"
    assert kinds["saturated_activations"]["evidence"]["activation_modules"] == ["layers.1.sigmoid"]
    assert kinds["dead_relu"]["severity"] == "high"
    assert rep["recommendations"]  # something minor was found


def test_thresholds_override():
    recs = vanishing_run(ratio=1e-3)
    assert diagnose(recs, final=True)["verdict"] == "healthy"
    assert diagnose(recs, final=True, thresholds={"vanishing_ratio": 1e-2})["verdict"] == "vanishing"
    spec = {"analysis": {"thresholds": {"vanishing_ratio": 1e-2}}}
    assert analyse(recs, spec=spec).verdict == "vanishing"
    assert resolve({"vanishing_ratio": "x", "nope": 1, "exploding_ratio": 10})["exploding_ratio"] == 10
    assert all(src for _, src in THRESHOLDS.values())


def test_certainty_needs_epochs_and_no_progress():
    recs = vanishing_run(epochs=3)
    assert not verdict_is_certain(recs[:1])
    assert verdict_is_certain(recs[:2])
    assert not verdict_is_certain(healthy_run(5))
    moving = copy.deepcopy(recs[:2])
    moving[1]["loss"] = 1.0  # the loss still falls: not certain
    assert not verdict_is_certain(moving)


def test_report_shape_and_json():
    for recs in (healthy_run(), vanishing_run(), []):
        rep = diagnose(recs, final=False)
        assert set(rep) >= {"final", "verdict", "confidence", "summary", "findings", "layers", "recommendations"}
        assert rep["verdict"] in ("vanishing", "exploding", "healthy")
        assert rep["final"] is False
        json.dumps(rep, allow_nan=False)
        for f in rep["findings"]:
            assert set(f) >= {"kind", "severity", "layers", "epochs", "evidence", "message"}
        for i, r in enumerate(rep["recommendations"], 1):
            assert r["priority"] == i
            assert set(r) >= {"id", "priority", "title", "rationale", "addresses", "patch", "code", "verification"}


def test_autotrainer_baseline():
    assert autotrainer_verdict(vanishing_run(ratio=1e-5)) == "vanishing"
    # ratio < 1e-3 but the first layer's norm is not < 1e-4: the rule needs both
    recs = [record(e, 2.3, mlp([5e-4, 1e-3, 1.0]), metrics=acc(0.1)) for e in (1, 2)]
    assert autotrainer_verdict(recs) == "healthy"
    recs = [record(e, 2.3, mlp([80.0, 1.0, 1.0]), metrics=acc(0.1)) for e in (1, 2)]
    assert autotrainer_verdict(recs) == "exploding"


# ------------------------------------------------------------------ tiny real trainings
FAST_CASES = [  # (spec file, expected verdict): a fast subset of the labelled benchmark
    ("benchmark/cases/03-deep-silu-default-init-teacher.json", "vanishing"),
    ("benchmark/cases/06-elu-xavier-gain3-spirals.json", "exploding"),
    ("benchmark/cases/05-rmsprop-high-lr-spirals.json", "exploding"),
    ("bench/cases/30-shallow-sigmoid-digits-sgd.json", "healthy"),
    ("bench/cases/03-he2015-deep-relu-var1n-nobias-blobs.json", "vanishing"),
]


@pytest.mark.parametrize("path,expected", FAST_CASES, ids=[Path(p).stem[:24] for p, _ in FAST_CASES])
def test_fast_benchmark_subset(path, expected):
    import torch

    from models.training import train
    from models.validation import Limits, check_spec

    torch.set_num_threads(1)
    raw = json.loads((ROOT / path).read_text())
    result = train(check_spec(raw, Limits()), device="cpu", early_stop=True)
    rep = diagnose(result.records, spec=raw, final=True)
    assert rep["verdict"] == expected, rep["summary"]
    if expected != "healthy":
        assert rep["recommendations"] and rep["recommendations"][0]["patch"]
        assert result.stopped == "early_stop"
