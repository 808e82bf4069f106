"""Builder: every benchmark case validates, builds and runs; names; inits; determinism."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from models.builder import Built, BuiltLayer, build_model
from models.datasets import make_dataset
from models.spec import INIT_NAMES
from models.validation import check_spec, infer_network

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CASES = sorted((ROOT / "benchmark" / "cases").glob("*.json"))


def _case(prefix: str) -> dict:
    (path,) = [p for p in CASES if p.name.startswith(prefix)]
    return json.loads(path.read_text())


def _spec(layers, data=None, **training):
    return {
        "network": {"layers": layers},
        "data": data or {"name": "blobs", "features": 16, "classes": 3, "n_samples": 50},
        "training": {"seed": 0, **training},
    }


def test_there_are_12_cases():
    assert len(CASES) == 12


@pytest.mark.parametrize("path", CASES, ids=[p.stem[:2] for p in CASES])
def test_benchmark_case_validates_builds_and_runs(path):
    raw = json.loads(path.read_text())
    spec = check_spec(copy.deepcopy(raw))
    assert spec.model_dump(mode="json", exclude_unset=True) == raw
    built = build_model(spec)
    assert isinstance(built, Built)
    ds = make_dataset(spec.data)
    out = built.module(ds.x[:7])
    assert out.shape == (7, ds.n_outputs)
    assert torch.isfinite(out).all()
    # analytic parameter count (used for the limit) equals the real one
    assert infer_network(spec).n_parameters == built.n_parameters == sum(p.numel() for p in built.module.parameters())
    # every reported layer is a real module, with parameters, of the reported type
    modules = dict(built.module.named_modules())
    assert built.layers, "at least one weighted layer"
    for bl in built.layers:
        assert bl.name in modules and bl.name.endswith("." + bl.type)
        assert any(True for _ in modules[bl.name].parameters())
        node = raw
        for part in bl.pointer.split("/")[1:]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node["type"] == bl.type
    # and every module with its own parameters is reported
    own = {n for n, m in built.module.named_modules() if any(True for _ in m.parameters(recurse=False))}
    assert own == {bl.name for bl in built.layers}


def test_benchmark_fixes_validate_and_build():
    jsonpatch = pytest.importorskip("jsonpatch")
    labels = json.loads((ROOT / "benchmark" / "labels.json").read_text())
    for path in CASES:
        fix = labels[path.name].get("fix")
        if not fix:
            continue
        patched = jsonpatch.apply_patch(json.loads(path.read_text()), fix)
        spec = check_spec(patched)
        built = build_model(spec)
        ds = make_dataset(spec.data)
        assert built.module(ds.x[:3]).shape == (3, ds.n_outputs)


def test_names_case_02_repeat():
    built = build_model(check_spec(_case("02")))
    names = [bl.name for bl in built.layers]
    assert names[0] == "layers.0.0.layers.0.conv2d"
    assert names[13] == "layers.0.13.layers.0.conv2d"
    assert names[-1] == "layers.3.linear"
    assert len(names) == 15
    assert {bl.pointer for bl in built.layers[:14]} == {"/network/layers/0/layers/0"}
    modules = dict(built.module.named_modules())
    assert isinstance(modules["layers.0.5.layers.1.relu"], torch.nn.ReLU)
    assert isinstance(modules["layers.1.avg_pool2d"], torch.nn.AvgPool2d)


def test_names_case_04_repeat_of_residual():
    built = build_model(check_spec(_case("04")))
    names = [bl.name for bl in built.layers]
    assert names[:3] == ["layers.0.linear", "layers.1.0.layers.0.layers.0.linear", "layers.1.0.layers.0.layers.2.linear"]
    assert names[-1] == "layers.2.linear"
    assert built.layers[1] == BuiltLayer(
        name="layers.1.0.layers.0.layers.0.linear", type="linear", pointer="/network/layers/1/layers/0/layers/0"
    )
    modules = dict(built.module.named_modules())
    assert isinstance(modules["layers.1.9.layers.1.sigmoid"], torch.nn.Sigmoid)


def test_repeat_copies_are_independent():
    built = build_model(check_spec(_case("03")))
    m = dict(built.module.named_modules())
    w1 = m["layers.0.1.layers.0.linear"].weight
    w2 = m["layers.0.2.layers.0.linear"].weight
    assert w1.shape == w2.shape and w1.data_ptr() != w2.data_ptr()
    assert not torch.equal(w1, w2)


def test_build_is_deterministic_and_leaves_global_rng_alone():
    spec = check_spec(_case("11"))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(spec).module.state_dict()
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_model(spec).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    raw = _case("11")
    raw["training"]["seed"] = 1
    c = build_model(check_spec(raw)).module.state_dict()
    assert not torch.equal(a["layers.0.conv2d.weight"], c["layers.0.conv2d.weight"])


def test_rnn_output_modes_and_stacking():
    data = {"name": "adding", "seq_len": 9, "n_samples": 8}
    for cell in ("rnn", "lstm", "gru"):
        last = build_model(check_spec(_spec([{"type": "rnn", "cell": cell, "hidden_size": 5, "num_layers": 2},
                                              {"type": "linear", "out_features": 1}], data)))
        x = make_dataset(check_spec(_spec([{"type": "flatten"}, {"type": "linear", "out_features": 1}], data)).data).x
        assert last.module(x).shape == (8, 1)
        rnn_slot = dict(last.module.named_modules())["layers.0"]
        assert rnn_slot(x).shape == (8, 5)
        # "last" is the top layer's h at the last step
        seq_out, _ = rnn_slot.inner(x)
        assert torch.allclose(rnn_slot(x), seq_out[:, -1])
        seq = build_model(check_spec(_spec([{"type": "rnn", "cell": cell, "hidden_size": 5, "output": "sequence"},
                                            {"type": "flatten"}, {"type": "linear", "out_features": 1}], data)))
        assert dict(seq.module.named_modules())["layers.0"](x).shape == (8, 9, 5)
        assert seq.module(x).shape == (8, 1)


def test_batch_norm_and_layer_norm_pick_by_rank():
    img = {"name": "digits", "shape": "image", "n_samples": 20}
    built = build_model(check_spec(_spec([
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3}, {"type": "batch_norm"}, {"type": "layer_norm"},
        {"type": "prelu"}, {"type": "flatten"}, {"type": "batch_norm"}, {"type": "layer_norm"},
        {"type": "linear", "out_features": 10}], img)))
    m = dict(built.module.named_modules())
    assert isinstance(m["layers.1.batch_norm"], torch.nn.BatchNorm2d) and m["layers.1.batch_norm"].num_features == 4
    assert m["layers.2.layer_norm"].normalized_shape == (4, 6, 6)
    assert isinstance(m["layers.5.batch_norm"], torch.nn.BatchNorm1d) and m["layers.5.batch_norm"].num_features == 144
    assert m["layers.6.layer_norm"].normalized_shape == (144,)
    assert [(b.name, b.type) for b in built.layers] == [
        ("layers.0.conv2d", "conv2d"), ("layers.1.batch_norm", "batch_norm"), ("layers.2.layer_norm", "layer_norm"),
        ("layers.3.prelu", "prelu"), ("layers.5.batch_norm", "batch_norm"), ("layers.6.layer_norm", "layer_norm"),
        ("layers.7.linear", "linear")]
    assert built.module(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_residual_adds_input():
    built = build_model(check_spec(_spec([
        {"type": "residual", "layers": [{"type": "linear", "out_features": 16, "init": "zeros", "bias_init": "zeros"}]},
        {"type": "linear", "out_features": 3}])))
    block = dict(built.module.named_modules())["layers.0"]
    x = torch.randn(4, 16)
    assert torch.equal(block(x), x)


def test_every_activation_and_shape_layer_builds():
    acts = ["relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "tanh", "sigmoid", "softplus", "identity"]
    layers = [{"type": "conv2d", "out_channels": 3, "kernel_size": 2, "stride": 1, "padding": [1, 0]},
              {"type": "max_pool2d", "kernel_size": 2}, {"type": "avg_pool2d", "kernel_size": [2, 1], "stride": 1},
              {"type": "dropout", "p": 0.1}]
    layers += [{"type": a} for a in acts]
    layers += [{"type": "flatten"}, {"type": "linear", "out_features": 10, "bias": False}]
    built = build_model(check_spec(_spec(layers, {"name": "digits", "shape": "image"})))
    assert built.output_shape == (10,)
    m = dict(built.module.named_modules())
    for j, a in enumerate(acts, start=4):
        assert f"layers.{j}.{a}" in m
    assert built.module(torch.rand(2, 1, 8, 8)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# inits: each name, a statistical property


def _linear_weight(init, fan_in=400, fan_out=300, bias_init=None):
    layer = {"type": "linear", "out_features": fan_out, "init": init}
    if bias_init is not None:
        layer["bias_init"] = bias_init
    built = build_model(check_spec(_spec([layer, {"type": "linear", "out_features": 3}],
                                         {"name": "blobs", "features": fan_in, "classes": 3, "n_samples": 10})))
    return dict(built.module.named_modules())["layers.0.linear"]


def test_init_default_is_pytorchs():
    lin = _linear_weight("default")
    bound = 1 / math.sqrt(400)
    assert lin.weight.abs().max() <= bound
    assert abs(lin.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert lin.bias.abs().max() <= bound and lin.bias.abs().max() > 0


def test_init_zeros_ones_constant():
    assert torch.count_nonzero(_linear_weight("zeros").weight) == 0
    assert torch.all(_linear_weight("ones").weight == 1)
    lin = _linear_weight({"name": "constant", "value": -0.25}, bias_init={"name": "constant", "value": 0.5})
    assert torch.all(lin.weight == -0.25) and torch.all(lin.bias == 0.5)


def test_init_normal_and_uniform():
    w = _linear_weight({"name": "normal", "mean": 0.5, "std": 0.05}).weight
    assert abs(w.mean().item() - 0.5) < 0.002 and abs(w.std().item() - 0.05) < 0.002
    w = _linear_weight({"name": "uniform", "a": -0.3, "b": 0.1}).weight
    assert w.min() >= -0.3 and w.max() <= 0.1
    assert abs(w.mean().item() + 0.1) < 0.005 and abs(w.std().item() - 0.4 / math.sqrt(12)) < 0.005


def test_init_xavier():
    fan_in, fan_out = 400, 300
    std = math.sqrt(2 / (fan_in + fan_out))
    w = _linear_weight({"name": "xavier_normal", "gain": 2.0}).weight
    assert abs(w.std().item() - 2 * std) < 0.03 * 2 * std
    w = _linear_weight("xavier_uniform").weight
    bound = math.sqrt(3) * std
    assert w.abs().max() <= bound and abs(w.std().item() - std) < 0.03 * std


def test_init_kaiming():
    w = _linear_weight("kaiming_normal").weight
    assert abs(w.std().item() - math.sqrt(2 / 400)) < 0.03 * math.sqrt(2 / 400)
    w = _linear_weight({"name": "kaiming_normal", "mode": "fan_out", "nonlinearity": "leaky_relu", "a": 0.1}).weight
    want = math.sqrt(2 / (1 + 0.01)) / math.sqrt(300)
    assert abs(w.std().item() - want) < 0.03 * want
    w = _linear_weight({"name": "kaiming_uniform", "nonlinearity": "tanh"}).weight
    want = (5 / 3) / math.sqrt(400)
    assert w.abs().max() <= math.sqrt(3) * want and abs(w.std().item() - want) < 0.03 * want


def test_init_orthogonal():
    w = _linear_weight({"name": "orthogonal", "gain": 1.5}, fan_in=300, fan_out=200).weight  # [200, 300]
    assert torch.allclose(w @ w.T, 2.25 * torch.eye(200), atol=1e-4)


def test_every_init_name_is_covered():
    covered = {"default", "zeros", "ones", "constant", "normal", "uniform", "xavier_uniform", "xavier_normal",
               "kaiming_uniform", "kaiming_normal", "orthogonal"}
    assert covered == set(INIT_NAMES)


def test_rnn_inits_apply_per_role_and_per_gate():
    data = {"name": "adding", "seq_len": 5, "n_samples": 4}
    built = build_model(check_spec(_spec([
        {"type": "rnn", "cell": "lstm", "hidden_size": 16, "num_layers": 2, "init": "ones",
         "recurrent_init": "orthogonal", "bias_init": {"name": "constant", "value": 0.3}},
        {"type": "linear", "out_features": 1}], data)))
    lstm = dict(built.module.named_modules())["layers.0.rnn"]
    assert isinstance(lstm, torch.nn.LSTM) and lstm.batch_first
    for k in range(2):
        assert torch.all(getattr(lstm, f"weight_ih_l{k}") == 1)
        for b in ("bias_ih", "bias_hh"):
            assert torch.all(getattr(lstm, f"{b}_l{k}") == 0.3)
        for gate in getattr(lstm, f"weight_hh_l{k}").detach().chunk(4):
            assert torch.allclose(gate @ gate.T, torch.eye(16), atol=1e-5)
    conv = build_model(check_spec(_spec([
        {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "init": "kaiming_normal", "bias_init": "zeros"},
        {"type": "flatten"}, {"type": "linear", "out_features": 10}], {"name": "digits", "shape": "image"})))
    c = dict(conv.module.named_modules())["layers.0.conv2d"]
    assert torch.count_nonzero(c.bias) == 0
    assert abs(c.weight.std().item() - math.sqrt(2 / 9)) < 0.1 * math.sqrt(2 / 9)
