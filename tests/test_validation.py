"""check_spec: every refusal names the exact JSON Pointer and says why."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest

from models.validation import Limits, SpecError, SpecProblem, check_spec, infer_network, pointer_of, spec_problems

ROOT = Path(__file__).resolve().parents[1]

IMG = {"name": "digits", "shape": "image"}
ADD = {"name": "adding", "seq_len": 10}
OUT10 = {"type": "linear", "out_features": 10}


def spec(layers=None, data=None, training=None, analysis=None, **top):
    d = {"network": {"layers": [OUT10] if layers is None else layers}, "data": data or {"name": "digits"}}
    if training is not None:
        d["training"] = training
    if analysis is not None:
        d["analysis"] = analysis
    d.update(top)
    return d


def nest(depth):
    d = {"type": "relu"}
    for _ in range(depth):
        d = {"type": "residual", "layers": [d]}
    return d


CONV = {"type": "conv2d", "out_channels": 4, "kernel_size": 3}

BAD = [
    # (id, raw spec, pointer, fragment of the message)
    ("conv-on-flat", spec([CONV, {"type": "flatten"}, OUT10]), "/network/layers/0",
     'conv2d needs an input of shape [C, H, W] but gets [64] (flat); use data.shape "image"'),
    ("wrong-output-size", spec([{"type": "linear", "out_features": 32}, {"type": "relu"},
                                {"type": "linear", "out_features": 7}]),
     "/network/layers/2/out_features", "the last layer outputs 7 values but dataset digits has 10 classes"),
    ("unknown-layer-type", spec([{"type": "linear", "out_features": 8}, {"type": "relu"}, {"type": "dense"}, OUT10]),
     "/network/layers/2/type", "unknown layer type 'dense'; known types: linear, conv2d, rnn"),
    ("typo-layer-type", spec([{"type": "sigmod"}, OUT10]), "/network/layers/0/type", "did you mean 'sigmoid'?"),
    ("unknown-init-name", spec([{"type": "linear", "out_features": 10, "init": "he"}]),
     "/network/layers/0/init", "unknown init 'he'; known inits: default, zeros"),
    ("unknown-init-object-name", spec([{"type": "linear", "out_features": 10, "init": {"name": "he_normal"}}]),
     "/network/layers/0/init/name", "unknown init 'he_normal'"),
    ("init-field-typo", spec([{"type": "linear", "out_features": 10, "init": {"name": "normal", "sdt": 0.1}}]),
     "/network/layers/0/init/sdt", "unknown field 'sdt' in the normal init (did you mean 'std'?)"),
    ("layer-field-typo", spec([{"type": "linear", "out_feature": 10}]),
     "/network/layers/0/out_feature", "did you mean 'out_features'?"),
    ("missing-out-features", spec([{"type": "linear"}]), "/network/layers/0/out_features",
     "a linear layer needs 'out_features'"),
    ("residual-changes-shape", spec([{"type": "residual", "layers": [{"type": "linear", "out_features": 32}]}, OUT10]),
     "/network/layers/0", "the residual block turns [64] into [32]"),
    ("rnn-on-flat", spec([{"type": "rnn", "hidden_size": 8}, OUT10]), "/network/layers/0",
     "rnn needs a sequence input of shape [T, F] but gets [64] (flat)"),
    ("kernel-larger-than-input", spec([{"type": "conv2d", "out_channels": 4, "kernel_size": 9}, {"type": "flatten"},
                                       OUT10], IMG),
     "/network/layers/0/kernel_size", "the 9x9 kernel is larger than its input of 8x8"),
    ("pool-larger-than-input", spec([CONV, {"type": "max_pool2d", "kernel_size": 7}, {"type": "flatten"}, OUT10], IMG),
     "/network/layers/1/kernel_size", "pooling window is larger than its input of 6x6"),
    ("linear-on-image", spec([CONV, OUT10], IMG), "/network/layers/1",
     'linear needs a flat input [F] (or a sequence [T, F]) but gets [4, 6, 6]'),
    ("image-output", spec([CONV], IMG), "/network/layers/0",
     "the network outputs an image [4, 6, 6] per sample but dataset digits has 10 classes"),
    ("sequence-output", spec([{"type": "rnn", "hidden_size": 4, "output": "sequence"},
                              {"type": "linear", "out_features": 1}], ADD),
     "/network/layers/1", 'use output "last" on the rnn'),
    ("regression-outputs", spec([{"type": "linear", "out_features": 3}], {"name": "teacher", "outputs": 2}),
     "/network/layers/0/out_features", "dataset teacher has 2 regression outputs"),
    ("no-weighted-output", spec([{"type": "relu"}]), "/network/layers/0",
     "the network outputs 64 values (the size of its input) but dataset digits has 10 classes"),
    ("repeat-in-copy-4", spec([{"type": "repeat", "times": 4, "layers": [
        {"type": "conv2d", "out_channels": 2, "kernel_size": 3}]}, {"type": "flatten"}, OUT10], IMG),
     "/network/layers/0/layers/0/kernel_size", "(in repetition 4 of 4); each copy of the repeated block changes the shape, so copy 4 gets [2, 2, 2]"),
    ("batch-norm-on-sequence", spec([{"type": "batch_norm"}, {"type": "rnn", "hidden_size": 3},
                                     {"type": "linear", "out_features": 1}], ADD),
     "/network/layers/0", "use layer_norm"),
    ("input-shape-disagrees", spec(network={"layers": [OUT10], "input_shape": [1, 8, 8]}), "/network/input_shape",
     "network.input_shape is [1, 8, 8] but dataset digits with shape \"flat\" gives inputs of shape [64]"),
    ("empty-layers", spec([]), "/network/layers", "at least one layer"),
    ("layer-not-object", spec(["relu", OUT10]), "/network/layers/0", 'each layer must be an object'),
    ("unknown-dataset", spec(data={"name": "mnist"}), "/data/name",
     "unknown dataset 'mnist'; built-in datasets: digits, spirals, blobs, teacher, adding"),
    ("dataset-field-typo", spec([{"type": "linear", "out_features": 3}], {"name": "blobs", "featurs": 4}),
     "/data/featurs", "did you mean 'features'?"),
    ("digits-shape-typo", spec(data={"name": "digits", "shape": "img"}), "/data/shape", "did you mean 'image'?"),
    ("too-many-samples", spec([{"type": "linear", "out_features": 2}], {"name": "spirals", "n_samples": 100_001}),
     "/data/n_samples", "n_samples is 100,001; the limit is 100,000"),
    ("digits-too-many", spec(data={"name": "digits", "n_samples": 2000}), "/data/n_samples",
     "digits has only 1,797 samples"),
    ("negative-lr", spec(training={"lr": -0.1}), "/training/lr", "lr must be > 0"),
    ("nan-lr", spec(training={"lr": float("nan")}), "/training/lr", "lr must be a finite number, not NaN"),
    ("inf-std", spec([{"type": "linear", "out_features": 10, "init": {"name": "normal", "std": float("inf")}}]),
     "/network/layers/0/init/std", "must be a finite number, not Infinity"),
    ("too-many-epochs", spec(training={"epochs": 1001}), "/training/epochs", "epochs is 1,001; the limit is 1,000"),
    ("zero-batch", spec(training={"batch_size": 0}), "/training/batch_size", "batch_size must be >= 1, got 0"),
    ("bool-batch", spec(training={"batch_size": True}), "/training/batch_size", "must be a whole number, got true"),
    ("unknown-optimizer", spec(training={"optimizer": "adamm"}), "/training/optimizer",
     "unknown optimizer 'adamm' (did you mean 'adam'?)"),
    ("unknown-optimizer-object", spec(training={"optimizer": {"name": "lbfgs"}}), "/training/optimizer/name",
     "must be one of: sgd, adam, adamw, rmsprop"),
    ("adam-momentum", spec(training={"optimizer": {"name": "adam", "momentum": 0.9}}),
     "/training/optimizer/momentum", "adam has no momentum option"),
    ("sgd-betas", spec(training={"optimizer": {"name": "sgd", "betas": [0.9, 0.99]}}),
     "/training/optimizer/betas", "sgd has no betas option"),
    ("clip-zero", spec(training={"grad_clip": {"max_norm": 0}}), "/training/grad_clip/max_norm",
     "max_norm must be > 0"),
    ("clip-both", spec(training={"grad_clip": {"max_norm": 1, "max_value": 1}}), "/training/grad_clip",
     'exactly one of "max_norm" or "max_value"'),
    ("loss-for-wrong-task", spec(training={"loss": "mse"}), "/training/loss",
     "loss mse is for regression but dataset digits is a classification task"),
    ("loss-unknown", spec(training={"loss": "hinge"}), "/training/loss", "it must be one of: auto, cross_entropy"),
    ("dropout-p-one", spec([{"type": "dropout", "p": 1.0}, OUT10]), "/network/layers/0/p", "p must be < 1.0"),
    ("verify-remedies", spec(analysis={"verify_remedies": 4}), "/analysis/verify_remedies",
     "at most 3 remedies can be verified"),
    ("threshold-inf", spec(analysis={"thresholds": {"vanishing_ratio": float("inf")}}),
     "/analysis/thresholds/vanishing_ratio", "must be a finite number"),
    ("top-level-typo", spec(trainig={"lr": 0.1}), "/trainig", "did you mean 'training'?"),
    ("too-many-layers", spec([{"type": "repeat", "times": 2001, "layers": [{"type": "relu"}]}, OUT10]),
     "/network/layers", "the network has 2,002 layers after expanding repeat; the limit is 2,000"),
    ("too-many-parameters", spec([{"type": "linear", "out_features": 5000}, {"type": "linear", "out_features": 5000},
                                  OUT10]),
     "/network", "the network has 25,380,010 parameters; the limit is 20,000,000 (the largest layer, /network/layers/1"),
    ("too-deep", spec([nest(40), OUT10]), "/network/layers/0" + "/layers/0" * 31 + "/layers",
     "blocks are nested 33 deep here; the limit is 32"),
    ("bias-init-matrix", spec([{"type": "linear", "out_features": 10, "bias_init": "orthogonal"}]),
     "/network/layers/0/bias_init", "a bias is a vector"),
    ("bias-init-without-bias", spec([{"type": "linear", "out_features": 10, "bias": False, "bias_init": "zeros"}]),
     "/network/layers/0/bias_init", "the layer has bias false"),
    ("constant-without-value", spec([{"type": "linear", "out_features": 10, "init": "constant"}]),
     "/network/layers/0/init", 'the constant init needs a value'),
    ("uniform-reversed", spec([{"type": "linear", "out_features": 10, "init": {"name": "uniform", "a": 1, "b": 0}}]),
     "/network/layers/0/init/b", "uniform init needs a <= b"),
    ("kaiming-bad-nonlinearity", spec([{"type": "linear", "out_features": 10,
                                        "init": {"name": "kaiming_normal", "nonlinearity": "swish"}}]),
     "/network/layers/0/init/nonlinearity", "nonlinearity is 'swish'; it must be one of: relu, leaky_relu"),
    ("lstm-nonlinearity", spec([{"type": "rnn", "cell": "lstm", "hidden_size": 4, "nonlinearity": "relu"},
                                {"type": "linear", "out_features": 1}], ADD),
     "/network/layers/0/nonlinearity", "nonlinearity only applies to cell 'rnn'"),
    ("rnn-unknown-cell", spec([{"type": "rnn", "cell": "transformer", "hidden_size": 4},
                               {"type": "linear", "out_features": 1}], ADD),
     "/network/layers/0/cell", "it must be one of: rnn, lstm, gru"),
    ("nested-unknown-type", spec([{"type": "repeat", "times": 2, "layers": [
        {"type": "residual", "layers": [{"type": "linearr", "out_features": 3}]}]}, OUT10]),
     "/network/layers/0/layers/0/layers/0/type", "did you mean 'linear'?"),
    ("nested-bad-number", spec([{"type": "repeat", "times": 2, "layers": [
        {"type": "linear", "out_features": 8, "init": {"name": "xavier_normal", "gain": -1}}]}, OUT10]),
     "/network/layers/0/layers/0/init/gain", "gain must be > 0"),
    ("repeat-zero-times", spec([{"type": "repeat", "times": 0, "layers": [{"type": "relu"}]}, OUT10]),
     "/network/layers/0/times", "times must be >= 1"),
    ("huge-activation", spec([{"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 500},
                              {"type": "flatten"}, OUT10], IMG),
     "/network/layers/0", "the limit is 2,000,000"),
    ("init-not-name-or-object", spec([{"type": "linear", "out_features": 10, "init": 5}]),
     "/network/layers/0/init", "init must be a name such as 'kaiming_normal' or an object with a name, got 5"),
    ("not-an-object", [1, 2], "", "the job spec must be a JSON object"),
    ("missing-network", {"data": {"name": "digits"}}, "/network", "the job spec needs 'network'"),
    ("missing-dataset-name", spec(data={"seed": 1}), "/data/name", "built-in datasets: digits"),
]


def test_at_least_25_distinct_bad_specs():
    assert len({case[0] for case in BAD}) == len(BAD) >= 25


@pytest.mark.parametrize("raw,pointer,fragment", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_spec_is_refused_with_pointer_and_reason(raw, pointer, fragment):
    before = copy.deepcopy(raw)
    with pytest.raises(SpecError) as info:
        check_spec(raw)
    problems = info.value.problems
    assert problems and all(isinstance(p, SpecProblem) for p in problems)
    matching = [p for p in problems if p.pointer == pointer]
    assert matching, f"no problem at {pointer!r}: {problems}"
    assert any(fragment in p.message for p in matching), matching
    assert raw == before or raw != raw  # never mutated (NaN compares unequal to itself)
    for p in problems:
        assert "body" not in p.pointer.split("/")
        assert not any(tag in p.pointer.split("/") for tag in ("obj", "str", "linear", "normal", "repeat"))
        assert len(p.message) > 15


def test_pointer_resolves_into_the_document():
    for name, raw, pointer, _ in BAD:
        if pointer in ("", "/network") or not isinstance(raw, dict):
            continue
        for p in spec_problems(raw):
            node = raw
            parts = p.pointer.split("/")[1:]
            for part in parts[:-1]:  # the last part may be missing (a required field)
                node = node[int(part)] if isinstance(node, list) else node[part]
            assert isinstance(node, (dict, list)), (name, p)


def test_several_problems_are_all_reported():
    raw = spec(training={"lr": 0, "batch_size": 0, "epochs": 0})
    pointers = {p.pointer for p in spec_problems(raw)}
    assert pointers == {"/training/lr", "/training/batch_size", "/training/epochs"}


def test_limits_are_configurable():
    raw = spec([{"type": "repeat", "times": 6, "layers": [{"type": "linear", "out_features": 10}]}],
               training={"epochs": 20}, analysis={"verify_remedies": 3})
    check_spec(raw)
    limits = Limits(max_parameters=500, max_epochs=10, max_layers=5, max_depth=1, max_samples=100,
                    max_verify_remedies=1)
    pointers = {p.pointer for p in spec_problems(raw, limits)}
    assert pointers == {"/network/layers/0/layers"}  # depth is checked first, on the raw document
    pointers = {p.pointer for p in spec_problems(raw, Limits(max_parameters=500, max_epochs=10, max_layers=5,
                                                            max_samples=100, max_verify_remedies=1))}
    assert pointers == {"/training/epochs", "/analysis/verify_remedies", "/network/layers", "/data/n_samples"}
    pointers = {p.pointer for p in spec_problems(raw, Limits(max_parameters=500))}
    assert pointers == {"/network"}


def test_parameter_limit_is_counted_without_allocating():
    # 2,000 layers of 4096x4096 would be 33 G parameters: refused instantly, nothing allocated
    raw = spec([{"type": "repeat", "times": 1999, "layers": [{"type": "linear", "out_features": 4096}]}, OUT10])
    problems = spec_problems(raw)
    assert [p.pointer for p in problems] == ["/network"]
    assert "33,5" in problems[0].message


def test_problem_details_is_rfc9457():
    with pytest.raises(SpecError) as info:
        check_spec(spec([{"type": "linear", "out_features": 7}], training={"lr": -1}))
    body = info.value.problem_details(instance="/v1/jobs")
    assert body["status"] == 422 and body["title"] and body["type"].startswith("https://")
    assert {e["pointer"] for e in body["errors"]} == {"/training/lr"}
    assert body["pointer"] == "/training/lr" and "/training/lr" in body["detail"]
    json.dumps(body)
    # shape problems only show once the schema is right
    with pytest.raises(SpecError) as info:
        check_spec(spec([{"type": "linear", "out_features": 7}]))
    assert info.value.problem_details()["errors"][0]["pointer"] == "/network/layers/0/out_features"


def test_pointer_of_strips_union_tags_and_escapes():
    raw = {"a/b": [{"c~d": 1}]}
    assert pointer_of(("a/b", 0, "tag", "c~d"), raw)[0] == "/a~1b/0/c~0d"
    assert pointer_of(("a/b", 0, "missing"), raw, keep_last=True)[0] == "/a~1b/0/missing"
    assert pointer_of(("a/b", 0, "obj"), raw)[0] == "/a~1b/0"


def test_valid_specs_pass_and_round_trip():
    for raw in [
        spec(),
        spec([{"type": "rnn", "cell": "gru", "hidden_size": 8, "num_layers": 2, "output": "sequence"},
              {"type": "layer_norm"}, {"type": "flatten"}, {"type": "linear", "out_features": 1}], ADD,
             training={"loss": "huber", "grad_clip": {"max_value": 0.5}}),
        spec([{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 1}, {"type": "batch_norm"},
              {"type": "residual", "layers": [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 1}]},
              {"type": "flatten"}, OUT10], IMG, network=None),
    ]:
        if raw.get("network") is None:
            raw["network"] = {"layers": raw.pop("network", None) or [], "input_shape": [1, 8, 8]}
        if not raw["network"]["layers"]:
            continue
        got = check_spec(copy.deepcopy(raw))
        assert got.model_dump(mode="json", exclude_unset=True) == raw


def test_benchmark_cases_pass_with_room():
    for path in sorted((ROOT / "benchmark" / "cases").glob("*.json")):
        spec_ = check_spec(json.loads(path.read_text()))
        inf = infer_network(spec_)
        assert inf.output_shape == (inf.output_shape[0],) and not inf.problems


def test_models_package_does_not_import_web_or_sql():
    """models/ is the pure ML core: no FastAPI, no SQL, no service (checked on the source)."""
    banned = {"fastapi", "starlette", "sqlalchemy", "alembic", "service"}
    for path in sorted((ROOT / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & banned, (path.name, names)
