"""models.remedies: patches against the spec as submitted (inside repeat/residual too), every
patched spec valid, the right remedy first for each cause, code sentences for external jobs."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonpatch
import pytest

from models import remedies as R
from models.builder import build_model
from models.diagnosis import diagnose
from models.validation import Limits, check_spec
from tests.test_diagnosis import acc, layer, mlp, record, vanishing_run

ROOT = Path(__file__).resolve().parents[1]
ALL_SPECS = sorted((ROOT / "benchmark" / "cases").glob("*.json")) + sorted((ROOT / "bench" / "cases").glob("*.json"))


def load(name: str) -> dict:
    for p in ALL_SPECS:
        if p.name.startswith(name):
            return json.loads(p.read_text())
    raise FileNotFoundError(name)


@pytest.mark.parametrize("path", ALL_SPECS, ids=[p.stem[:28] for p in ALL_SPECS])
def test_every_catalogue_patch_validates_and_keeps_the_original(path):
    raw = json.loads(path.read_text())
    before = copy.deepcopy(raw)
    for rid, remedy in R.CATALOGUE.items():
        patch = remedy.build(raw)
        assert raw == before, rid  # builders never mutate the submitted spec
        if not patch:
            continue
        patched = jsonpatch.apply_patch(raw, patch)
        if rid in ("add_residual",):  # may be refused by shape inference: recommend() filters it
            continue
        check_spec(patched, Limits())


def test_pointer_of_matches_builder():
    for name in ("04-residual-sigmoid", "02-deep-plain-cnn", "11-residual-cnn", "08-relu-rnn"):
        raw = load(name)
        built = build_model(check_spec(raw, Limits()))
        for bl in built.layers:
            assert R.pointer_of(raw, bl.name) == bl.pointer, bl.name


def test_relu_he_init_inside_repeat_and_trunk_activation():
    raw = load("04-residual-sigmoid")
    patch = R.CATALOGUE["use_relu_he_init"].build(raw)
    # the sigmoid on the residual trunk becomes identity (the skip path is kept clean)
    assert patch == [{"op": "replace", "path": "/network/layers/1/layers/1/type", "value": "identity"}]
    raw = load("01-glorot2010-deep-sigmoid-mlp")
    patch = R.CATALOGUE["use_relu_he_init"].build(raw)
    assert {"op": "replace", "path": "/network/layers/0/layers/1/type", "value": "relu"} in patch
    assert {"op": "add", "path": "/network/layers/0/layers/0/init",
            "value": {"name": "kaiming_normal", "nonlinearity": "relu"}} in patch


def test_he_init_matches_activation():
    raw = load("05-rmsprop-high-lr")  # leaky_relu slope 0.1, explicit inits -> replace
    patch = R.CATALOGUE["use_he_init"].build(raw)
    assert patch[0] == {"op": "replace", "path": "/network/layers/0/init",
                        "value": {"name": "kaiming_normal", "nonlinearity": "leaky_relu", "a": 0.1}}
    assert all(op["path"] != "/network/layers/6/init" for op in patch)  # the output layer stays


def test_recurrent_patches():
    raw = load("08-relu-rnn")
    p = R.CATALOGUE["orthogonal_recurrent_init"].build(raw)
    # a ReLU cell gets gain sqrt(2); plain SGD becomes Adam
    assert p[0] == {"op": "replace", "path": "/network/layers/0/recurrent_init",
                    "value": {"name": "orthogonal", "gain": 1.4142}}
    assert {"op": "replace", "path": "/training/optimizer", "value": "adam"} in p
    p = R.CATALOGUE["gated_recurrent_cell"].build(raw)
    assert {"op": "remove", "path": "/network/layers/0/nonlinearity"} in p
    check_spec(jsonpatch.apply_patch(raw, p), Limits())
    raw = load("01-lstm-long-adding")
    p = R.CATALOGUE["sequence_readout"].build(raw)
    patched = jsonpatch.apply_patch(raw, p)
    assert patched["network"]["layers"][0]["output"] == "sequence"
    assert patched["network"]["layers"][1] == {"type": "flatten"}
    assert patched["training"]["optimizer"] == "adam"


def test_lower_lr_and_clip():
    raw = load("07-cnn-sgd-momentum")
    # lr/10 = 0.05, capped at (1 - momentum) / depth = 0.1 / 3
    assert R.CATALOGUE["lower_learning_rate"].build(raw) == [{"op": "replace", "path": "/training/lr", "value": 0.0333}]
    assert R.weighted_depth(load("08-relu-rnn")) == 21  # the rnn counts once per time step (20) + 1
    raw = load("05-rmsprop-high-lr")  # adaptive optimizer: about 1e-3
    assert R.CATALOGUE["lower_learning_rate"].build(raw)[0]["value"] <= 2e-3
    assert R.CATALOGUE["clip_gradients"].build(raw) == [
        {"op": "add", "path": "/training/grad_clip", "value": {"max_norm": 1.0}}]


def test_norm_insertions_keep_indices_valid():
    raw = load("05-rmsprop-high-lr")
    patched = jsonpatch.apply_patch(raw, R.CATALOGUE["add_batch_norm"].build(raw))
    types = [l["type"] for l in patched["network"]["layers"]]
    assert types == ["linear", "batch_norm", "leaky_relu"] * 3 + ["linear"]


def test_break_symmetry():
    raw = load("08-zero-init-relu")
    patch = R.CATALOGUE["break_symmetry"].build(raw)
    patched = jsonpatch.apply_patch(raw, patch)
    inner = patched["network"]["layers"][0]["layers"][0]
    assert inner["init"]["name"] == "kaiming_normal"
    assert patched["network"]["layers"][1]["init"] == "default"
    check_spec(patched, Limits())


def test_recommendations_for_spec_and_external_jobs():
    raw = load("02-deep-plain-cnn")
    recs = [record(e, 2.30, [layer("layers.0.0.layers.0.conv2d", "conv2d", g=1e-7, g_first=1e-7),
                             layer("layers.3.linear", g=1.0)], metrics=acc(0.1), first=2.3) for e in (1, 2)]
    rep = diagnose(recs, spec=raw, final=True)
    top = rep["recommendations"][0]
    assert rep["verdict"] == "vanishing" and top["id"] == "use_he_init" and top["priority"] == 1
    assert top["patch"] == [{"op": "add", "path": "/network/layers/0/layers/0/init",
                             "value": {"name": "kaiming_normal", "nonlinearity": "relu"}}]
    assert top["code"] is None and top["verification"] is None and top["rationale"]
    assert "vanishing_gradients" in top["addresses"]
    for r in rep["recommendations"]:
        check_spec(jsonpatch.apply_patch(raw, r["patch"]), Limits())
    ext = diagnose(recs, spec=None, final=True)["recommendations"]
    assert ext and ext[0]["patch"] is None and "kaiming_normal_" in ext[0]["code"]


def test_cause_orders_remedies():
    lr = [record(1, None, mlp([1.0, 1.0, 1.0]), nonfinite=True, metrics=acc(0.1), first=2.3)]
    assert diagnose(lr, final=True)["recommendations"][0]["id"] == "lower_learning_rate"
    wide = [record(1, None, mlp([1.0, 1.0, 1.0]), nonfinite=True, metrics=acc(0.1), first=40.0)]
    assert diagnose(wide, final=True)["recommendations"][0]["id"] == "use_he_init"
    sat = {"mean": 0.5, "std": 0.1, "saturated_frac": 0.0, "dead_frac": 0.0, "module": "layers.0.1.sigmoid"}
    v = vanishing_run()
    for r in v:
        r["layers"][0]["activation"] = sat
    assert diagnose(v, final=True)["recommendations"][0]["id"] == "use_relu_he_init"


def test_compare_verification():
    c = R.compare_verification({"verdict": "healthy"}, 0.1, None)
    assert c == {"verdict": "healthy", "final_loss": 0.1, "baseline_final_loss": None, "improved": True}
    assert R.compare_verification({"verdict": "vanishing"}, 2.3, 2.3)["improved"] is False
    assert R.compare_verification({"verdict": "vanishing"}, 1.0, 2.3)["improved"] is True
    assert R.compare_verification({"verdict": "exploding"}, float("nan"), 2.3)["final_loss"] is None
    assert R.compare_verification(None, None, 1.0)["improved"] is False
