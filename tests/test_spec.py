"""The pydantic schema: contract names and defaults, strictness, round trip."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from models import spec as S
from models.spec import JobSpec

FULL = {
    "source": "spec",
    "name": "everything",
    "network": {
        "input_shape": [1, 8, 8],
        "layers": [
            {"type": "conv2d", "out_channels": 4, "kernel_size": [3, 3], "stride": 1, "padding": [1, 1], "bias": True,
             "init": {"name": "kaiming_normal", "nonlinearity": "leaky_relu", "a": 0.1, "mode": "fan_out"},
             "bias_init": "zeros"},
            {"type": "batch_norm"},
            {"type": "leaky_relu", "negative_slope": 0.2},
            {"type": "max_pool2d", "kernel_size": 2},
            {"type": "residual", "layers": [
                {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1, "init": "orthogonal"},
                {"type": "prelu"}]},
            {"type": "avg_pool2d", "kernel_size": 2, "stride": 2},
            {"type": "layer_norm"},
            {"type": "flatten"},
            {"type": "dropout", "p": 0.25},
            {"type": "repeat", "times": 2, "layers": [
                {"type": "linear", "out_features": 16, "bias": False, "init": {"name": "xavier_uniform", "gain": 2}},
                {"type": "elu", "alpha": 0.5}, {"type": "selu"}, {"type": "gelu"}, {"type": "silu"},
                {"type": "tanh"}, {"type": "sigmoid"}, {"type": "softplus", "beta": 2}, {"type": "identity"},
                {"type": "relu"}]},
            {"type": "linear", "out_features": 10, "init": {"name": "normal", "mean": 0, "std": 0.01},
             "bias_init": {"name": "constant", "value": 0.0}},
        ],
    },
    "data": {"name": "digits", "shape": "image", "n_samples": 500, "seed": 1},
    "training": {"optimizer": {"name": "adamw", "weight_decay": 0.01, "betas": [0.9, 0.99]}, "lr": 0.001,
                 "batch_size": 16, "epochs": 3, "grad_clip": {"max_value": 5.0}, "loss": "cross_entropy",
                 "seed": 7, "device": "cpu"},
    "analysis": {"early_stop": False, "verify_remedies": 2, "thresholds": {"vanishing_ratio": 1e-4}},
}


def test_full_spec_round_trips_exactly():
    spec = JobSpec.model_validate(copy.deepcopy(FULL))
    assert spec.model_dump(mode="json", exclude_unset=True) == FULL
    assert spec.raw() == FULL
    assert json.loads(spec.model_dump_json(exclude_unset=True)) == FULL


def test_contract_example_and_defaults():
    raw = {
        "name": "deep-sigmoid",
        "network": {"layers": [
            {"type": "repeat", "times": 20, "layers": [
                {"type": "linear", "out_features": 128, "init": {"name": "normal", "std": 0.05}},
                {"type": "sigmoid"}]},
            {"type": "linear", "out_features": 10}]},
        "data": {"name": "digits"},
        "training": {"optimizer": "sgd", "lr": 0.1, "batch_size": 64, "epochs": 10, "seed": 0},
        "analysis": {"early_stop": True, "verify_remedies": 0},
    }
    spec = JobSpec.model_validate(raw)
    assert spec.raw() == raw
    lin = spec.network.layers[1]
    assert (lin.bias, lin.init, lin.bias_init) == (True, "default", "default")
    assert spec.network.layers[0].layers[0].init.mean == 0.0
    t = spec.training
    assert (t.grad_clip, t.loss, t.device) == (None, "auto", "auto")
    assert spec.data.shape == "flat" and spec.data.n_samples is None
    minimal = JobSpec.model_validate({"network": {"layers": [{"type": "relu"}]}, "data": {"name": "adding"}})
    assert minimal.training.optimizer == "sgd" and minimal.training.epochs == 10
    assert minimal.analysis.early_stop is True and minimal.analysis.verify_remedies == 0
    assert minimal.analysis.thresholds is None
    assert minimal.raw() == {"network": {"layers": [{"type": "relu"}]}, "data": {"name": "adding"}}


def test_layer_defaults_follow_contract():
    def layer(d):
        return JobSpec.model_validate({"network": {"layers": [d]}, "data": {"name": "digits"}}).network.layers[0]

    conv = layer({"type": "conv2d", "out_channels": 3, "kernel_size": 3})
    assert (conv.stride, conv.padding, conv.bias) == (1, 0, True)
    rnn = layer({"type": "rnn", "hidden_size": 8})
    assert (rnn.cell, rnn.num_layers, rnn.nonlinearity, rnn.output, rnn.recurrent_init) == (
        "rnn", 1, "tanh", "last", "default")
    assert layer({"type": "leaky_relu"}).negative_slope == 0.01
    assert layer({"type": "dropout"}).p == 0.5
    assert layer({"type": "max_pool2d", "kernel_size": 2}).stride is None


def test_vocabularies_are_the_contracts():
    assert set(S.LAYER_TYPES) == {
        "linear", "conv2d", "rnn", "batch_norm", "layer_norm", "dropout", "flatten", "max_pool2d", "avg_pool2d",
        "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "tanh", "sigmoid", "softplus", "identity",
        "repeat", "residual"}
    assert set(S.INIT_NAMES) == {"default", "zeros", "ones", "constant", "normal", "uniform", "xavier_uniform",
                                 "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal"}
    assert set(S.OPTIMIZER_NAMES) == {"sgd", "adam", "adamw", "rmsprop"}
    assert set(S.DATASET_NAMES) == {"digits", "spirals", "blobs", "teacher", "adding"}
    # every layer type of the vocabulary parses
    for t in S.LAYER_TYPES:
        d = {"type": t}
        d.update({"linear": {"out_features": 2}, "conv2d": {"out_channels": 2, "kernel_size": 1},
                  "rnn": {"hidden_size": 2}, "max_pool2d": {"kernel_size": 1}, "avg_pool2d": {"kernel_size": 1},
                  "repeat": {"times": 1, "layers": [{"type": "relu"}]},
                  "residual": {"layers": [{"type": "relu"}]}}.get(t, {}))
        JobSpec.model_validate({"network": {"layers": [d]}, "data": {"name": "digits"}})


def test_init_forms_and_normalisation():
    assert S.init_object("kaiming_normal").model_dump() == {
        "name": "kaiming_normal", "nonlinearity": "relu", "a": 0.0, "mode": "fan_in"}
    assert S.init_object("xavier_uniform").gain == 1.0
    assert S.init_object({"name": "normal", "std": 0.1}).mean == 0.0
    with pytest.raises(ValidationError):
        S.init_object("constant")  # needs a value
    assert S.init_name("zeros") == "zeros"


def test_optimizer_spec_normalisation():
    t = S.Training(optimizer="adam")
    assert t.optimizer_spec() == S.OptimizerSpec(name="adam")
    o = S.Training.model_validate({"optimizer": {"name": "sgd", "momentum": 0.9}}).optimizer_spec()
    assert (o.name, o.momentum, o.weight_decay, o.betas) == ("sgd", 0.9, None, None)  # None = PyTorch's default


@pytest.mark.parametrize("bad", [
    {"lr": True}, {"lr": "0.1"}, {"epochs": 2.5}, {"epochs": "10"}, {"batch_size": None},
    {"lr": float("inf")}, {"lr": float("nan")}, {"device": "tpu"}, {"optimizer": {"name": "sgd", "nesterov": True}},
    {"grad_clip": {"max_norm": 1, "max_value": 1}}, {"seed": -1},
])
def test_training_is_strict(bad):
    with pytest.raises(ValidationError):
        S.Training.model_validate(bad)


def test_integral_floats_are_whole_numbers():
    t = S.Training.model_validate({"epochs": 10.0, "batch_size": 32.0})
    assert t.epochs == 10 and isinstance(t.epochs, int)


def test_json_schema_is_generated():
    schema = JobSpec.model_json_schema()
    assert "network" in schema["properties"] and "$defs" in schema
