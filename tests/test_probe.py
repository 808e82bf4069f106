"""gradwatch.Probe: every statistic against a plain computation on tiny models."""
from __future__ import annotations

import ast
import copy
import json
import math
import pathlib
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradwatch import Probe

torch.set_num_threads(1)

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def close(a, b, rel=1e-5, abs_=1e-7):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return (xs[(n - 1) // 2] + xs[n // 2]) / 2


class Net(nn.Module):
    """Named like gradwatch's own models: layers.i.type."""

    def __init__(self, spec):
        super().__init__()
        self.layers = nn.ModuleList()
        for t, mod in spec:
            holder = nn.Module()
            holder.add_module(t, mod)
            self.layers.append(holder)

    def forward(self, x):
        for holder in self.layers:
            for m in holder.children():
                x = m(x)
        return x


def mlp(act=nn.Tanh, width=6, depth=3, inp=5, out=3):
    spec, i = [], inp
    for _ in range(depth):
        spec += [("linear", nn.Linear(i, width)), (act.__name__.lower(), act())]
        i = width
    spec.append(("linear", nn.Linear(i, out)))
    return Net(spec)


def layer_norm_now(module):
    sq = 0.0
    for p in module.parameters(recurse=False):
        if p.grad is not None:
            sq += float(p.grad.double().pow(2).sum())
    return math.sqrt(sq)


def layer_maxabs_now(module):
    return max(float(p.grad.abs().max()) for p in module.parameters(recurse=False)
               if p.grad is not None)


def flat(module):
    return torch.cat([p.detach().double().reshape(-1) for p in module.parameters(recurse=False)])


class Recorder:
    """Captures the outputs of the given modules (clones) on every forward."""

    def __init__(self, modules):
        self.out = {id(m): [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, m, i, o):
        self.out[id(m)].append(o.detach().clone())


def run_epoch(model, probe, opt, batches, loss_fn, inject=None, on_grads=None):
    losses = []
    for k, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if inject is not None:
            inject(k, loss)
        if on_grads is not None:
            on_grads(k)
        losses.append(loss.item())
        probe.step(loss)
        opt.step()
    return losses


def dumps(record):
    return json.dumps(record, allow_nan=False)


# ----------------------------------------------------------------------------- layers
def test_layers_named_and_typed_in_registration_order():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)
            self.act = nn.ReLU()
            self.encoder = nn.Module()
            self.encoder.rnn = nn.GRU(4, 3)
            self.head = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
            self.scale = nn.Parameter(torch.ones(1))

    probe = Probe(M())
    assert probe.layers == [
        {"name": "root", "type": "m"},
        {"name": "conv", "type": "conv2d"},
        {"name": "bn", "type": "batchnorm2d"},
        {"name": "encoder.rnn", "type": "gru"},
        {"name": "head.0", "type": "linear"},
        {"name": "head.2", "type": "linear"},
    ]
    net = mlp()
    assert [l["name"] for l in Probe(net).layers] == [
        "layers.0.linear", "layers.2.linear", "layers.4.linear", "layers.6.linear"]


# ----------------------------------------------------------------------------- gradients, weights, loss
@pytest.fixture(params=["packed", "mixed", "foreach"])
def layout(request, monkeypatch):
    """Small gradients are packed per layer, large ones go through _foreach_norm: run the
    statistics tests with every tensor packed, weights large / biases packed, all large (and
    then the epoch statistics computed on the device instead of the host)."""
    import gradwatch._norms as norms_mod

    import gradwatch.probe as probe_mod

    big = {"packed": norms_mod.BIG, "mixed": 16, "foreach": 0}[request.param]
    monkeypatch.setattr(norms_mod, "BIG", big)
    if request.param == "foreach":  # and the epoch statistics reduced on the device
        monkeypatch.setattr(probe_mod, "_HOST_STATS", 0)
    return request.param


@pytest.mark.parametrize("every_step", [False, True])
def test_gradient_weight_and_loss_statistics_match_plain_computation(every_step, layout):
    torch.manual_seed(0)
    model = mlp(nn.Tanh)
    weighted = [m for m in model.modules() if isinstance(m, nn.Linear)]
    probe = Probe(model, every_step=every_step, sample_stride=3)
    stride = 1 if every_step else 3
    assert probe.sample_stride == stride
    assert Probe(mlp(nn.Tanh)).sample_stride == 32   # the default (bench/overhead.py)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    batches = [(torch.randn(7, 5), torch.randint(0, 3, (7,))) for _ in range(10)]
    for epoch in (1, 2):
        norms, maxabs = [], []
        start = [flat(m) for m in weighted]

        def on_grads(k):
            norms.append([layer_norm_now(m) for m in weighted])
            if k % stride == 0:
                maxabs.append([layer_maxabs_now(m) for m in weighted])

        losses = run_epoch(model, probe, opt, batches, nn.CrossEntropyLoss(), on_grads=on_grads)
        rec = probe.end_epoch(epoch, metrics={"accuracy": 0.5})
        dumps(rec)
        assert rec["epoch"] == epoch and rec["steps"] == 10 and rec["sample_stride"] == stride
        assert rec["metrics"] == {"accuracy": 0.5}
        assert rec["nonfinite"] is False
        assert close(rec["loss"], sum(losses) / len(losses))
        assert rec["loss_stats"] == pytest.approx(
            {"first": losses[0], "last": losses[-1], "min": min(losses), "max": max(losses)})
        for li, (m, lrec) in enumerate(zip(weighted, rec["layers"])):
            col = [row[li] for row in norms]
            g = lrec["grad_norm"]
            assert close(g["mean"], sum(col) / len(col))
            assert close(g["min"], min(col)) and close(g["max"], max(col))
            assert close(g["first"], col[0]) and close(g["last"], col[-1])
            assert close(g["median"], median(col))
            assert close(lrec["grad_max_abs"], max(r[li] for r in maxabs))
            end = flat(m)
            assert close(lrec["weight_norm"], float(end.norm()))
            assert close(lrec["update_ratio"], float((end - start[li]).norm() / start[li].norm()),
                         rel=1e-4)
            assert lrec["nonfinite_grads"] == 0


def test_nan_and_inf_injection(layout):
    torch.manual_seed(1)
    model = mlp(nn.ReLU)
    weighted = [m for m in model.modules() if isinstance(m, nn.Linear)]
    probe = Probe(model, sample_stride=2)

    class NoStep:  # no update: the injected NaNs must not spread into the weights
        zero_grad = model.zero_grad

        def step(self):
            pass

    opt = NoStep()
    batches = [(torch.randn(6, 5), torch.randint(0, 3, (6,))) for _ in range(8)]
    norms = []

    def inject(k, loss):
        if k == 2:
            weighted[0].weight.grad[0, 0] = float("nan")
        if k == 3:
            weighted[0].bias.grad[1] = float("inf")
            weighted[2].weight.grad[1, 1] = -float("inf")
        if k == 4:  # a sampled step: max |g| must skip it too
            weighted[1].weight.grad.fill_(float("nan"))
        norms.append([layer_norm_now(m) for m in weighted])

    run_epoch(model, probe, opt, batches, nn.CrossEntropyLoss(), inject=inject)
    rec = probe.end_epoch(1)
    dumps(rec)
    assert rec["nonfinite"] is True
    assert rec["loss"] is not None  # the loss itself stayed finite
    assert [l["nonfinite_grads"] for l in rec["layers"]] == [2, 1, 1, 0]
    for li, lrec in enumerate(rec["layers"]):
        finite = [r[li] for r in norms if math.isfinite(r[li])]
        assert close(lrec["grad_norm"]["mean"], sum(finite) / len(finite))
        assert close(lrec["grad_norm"]["max"], max(finite))
        assert close(lrec["grad_norm"]["median"], median(finite))
    assert rec["layers"][1]["grad_max_abs"] is not None

    # a non-finite loss: loss null, nonfinite true, stats over the finite values
    for k, (x, y) in enumerate(batches[:3]):
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        probe.step(loss * float("inf") if k == 1 else loss)
    rec = probe.end_epoch(2)
    dumps(rec)
    assert rec["loss"] is None and rec["nonfinite"] is True
    assert rec["loss_stats"]["first"] is not None and rec["loss_stats"]["last"] is not None


def test_all_steps_nonfinite_gives_nulls():
    model = nn.Linear(3, 1)
    probe = Probe(model)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        model.weight.grad.fill_(float("nan"))
        probe.step(torch.tensor(float("nan")))
    rec = probe.end_epoch(1)
    dumps(rec)
    layer = rec["layers"][0]
    assert layer["nonfinite_grads"] == 3
    assert all(v is None for v in layer["grad_norm"].values())
    assert layer["grad_max_abs"] is None
    assert rec["loss"] is None and rec["loss_stats"]["min"] is None


def test_missing_gradients_count_as_zero_and_empty_epoch(layout):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = M()
    probe = Probe(model)
    rec = probe.end_epoch(1)  # no steps at all
    dumps(rec)
    assert rec["steps"] == 0 and rec["loss"] is None
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        probe.step()  # loss is optional
    rec = probe.end_epoch(2)
    dumps(rec)
    unused = rec["layers"][1]
    assert unused["grad_norm"]["mean"] == 0.0 and unused["nonfinite_grads"] == 0
    assert unused["grad_max_abs"] == 0.0 and unused["update_ratio"] == 0.0
    assert rec["layers"][0]["grad_norm"]["mean"] > 0
    assert rec["loss"] is None


def test_flush_over_many_steps_keeps_every_step(monkeypatch, layout):
    import gradwatch.probe as probe_mod

    monkeypatch.setattr(probe_mod, "_CHUNK_ROWS", 3)  # reduce the per-step rows every 3 steps
    monkeypatch.setattr(probe_mod, "_ACT_FLUSH", 2)
    torch.manual_seed(2)
    model = mlp(nn.Sigmoid)
    weighted = [m for m in model.modules() if isinstance(m, nn.Linear)]
    probe = Probe(model, sample_stride=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(5, 5), torch.randint(0, 3, (5,))) for _ in range(13)]
    acts = [m for m in model.modules() if isinstance(m, nn.Sigmoid)]
    recorder = Recorder(acts)
    for epoch in (1, 2):
        norms, maxabs = [], []

        def on_grads(k):
            norms.append([layer_norm_now(m) for m in weighted])
            if k % 4 == 0:
                maxabs.append([layer_maxabs_now(m) for m in weighted])

        losses = run_epoch(model, probe, opt, batches, nn.CrossEntropyLoss(), on_grads=on_grads)
        rec = probe.end_epoch(epoch)
        assert close(rec["loss"], sum(losses) / len(losses))
        for li, lrec in enumerate(rec["layers"]):
            col = [r[li] for r in norms]
            assert close(lrec["grad_norm"]["mean"], sum(col) / len(col))
            assert close(lrec["grad_norm"]["median"], median(col))
            assert close(lrec["grad_norm"]["first"], col[0])
            assert close(lrec["grad_norm"]["last"], col[-1])
            assert close(lrec["grad_max_abs"], max(r[li] for r in maxabs))
        for li, a in enumerate(acts):
            outs = recorder.out[id(a)][(epoch - 1) * 13: epoch * 13]
            ref = act_reference([o for k, o in enumerate(outs) if k % 4 == 0], "sigmoid")
            got = rec["layers"][li]["activation"]
            for key in ("mean", "std", "saturated_frac"):
                assert close(got[key], ref[key], rel=1e-4, abs_=1e-7)


@pytest.mark.parametrize("hist_bytes", [1, 2100, 1 << 22])
def test_deferred_norms_across_history_chunk_and_fallback_steps(monkeypatch, layout, hist_bytes):
    """The small gradients' norms are computed every few steps from a history buffer: every
    step's norm must still land in its own row, across history flushes (1, a few, or 16
    steps deep), chunk reductions (every 5 steps), steps where a gradient is missing (the
    fallback path, mid-history) and epochs."""
    import gradwatch._norms as norms_mod
    import gradwatch.probe as probe_mod

    monkeypatch.setattr(norms_mod, "_HIST_BYTES", hist_bytes)
    monkeypatch.setattr(probe_mod, "_CHUNK_ROWS", 5)
    torch.manual_seed(5)
    model = mlp(nn.Tanh)
    weighted = [m for m in model.modules() if isinstance(m, nn.Linear)]
    probe = Probe(model, sample_stride=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in (1, 2):
        norms, maxabs = [], []
        for k in range(23):
            opt.zero_grad()
            x = torch.randn(4, 5)
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (4,)))
            loss.backward()
            if k % 7 == 4:   # a layer without a gradient on this step: the fallback
                weighted[1].bias.grad = None
            norms.append([layer_norm_now(m) for m in weighted])
            if k % 3 == 0:
                maxabs.append([max((float(p.grad.abs().max()) for p in m.parameters(recurse=False)
                                    if p.grad is not None), default=0.0) for m in weighted])
            probe.step(loss)
            opt.step()
        rec = probe.end_epoch(epoch)
        assert rec["steps"] == 23
        for li, lrec in enumerate(rec["layers"]):
            col = [r[li] for r in norms]
            assert close(lrec["grad_norm"]["first"], col[0])
            assert close(lrec["grad_norm"]["last"], col[-1])
            assert close(lrec["grad_norm"]["mean"], sum(col) / len(col))
            assert close(lrec["grad_norm"]["median"], median(col))
            assert close(lrec["grad_norm"]["min"], min(col))
            assert close(lrec["grad_norm"]["max"], max(col))
            assert close(lrec["grad_max_abs"], max(r[li] for r in maxabs))


def test_loss_accepted_as_tensor_vector_number_or_none():
    """The loss is kept as an alias until the chunk is stacked: a later in-graph loss, a
    per-sample vector (its mean), a Python or NumPy number and None all land in order."""
    np = pytest.importorskip("numpy")
    model = mlp(nn.Tanh)
    probe = Probe(model)
    given = []
    for k, kind in enumerate(["tensor", "vector", "float", "numpy", "none", "tensor"]):
        model.zero_grad()
        out = model(torch.randn(4, 5))
        per_sample = out.pow(2).mean(dim=1)
        per_sample.mean().backward()
        value = float(per_sample.detach().mean())
        loss = {"tensor": per_sample.mean(), "vector": per_sample, "float": value,
                "numpy": np.float32(value), "none": None}[kind]
        probe.step(loss)
        if kind != "none":
            given.append(value)
    rec = probe.end_epoch(1)
    assert rec["steps"] == 6
    assert close(rec["loss"], sum(given) / len(given), rel=1e-6)
    assert close(rec["loss_stats"]["first"], given[0], rel=1e-6)
    assert close(rec["loss_stats"]["last"], given[-1], rel=1e-6)


def test_frozen_layers_stay_on_the_fast_path_and_unfreezing_is_seen(monkeypatch, layout):
    """Fine-tuning: a frozen layer has no gradient. It must count as a zero norm without
    sending every step down the slow fallback; a layer unfrozen between epochs is measured
    from the next epoch on, one frozen mid-epoch from the next sampled step on."""
    import gradwatch._norms as norms_mod

    fallbacks = []
    real = norms_mod.NormPlan.write_fallback
    monkeypatch.setattr(norms_mod.NormPlan, "write_fallback",
                        lambda plan, row: (fallbacks.append(1), real(plan, row)))
    torch.manual_seed(6)
    model = mlp(nn.Tanh)
    weighted = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for p in weighted[0].parameters():
        p.requires_grad_(False)
    probe = Probe(model, sample_stride=4)
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.1)

    def epoch(n, on_step=None):
        norms = []
        for k in range(9):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randn(4, 5)),
                                        torch.randint(0, 3, (4,))).backward()
            norms.append([layer_norm_now(m) for m in weighted])
            probe.step()
            opt.step()
            if on_step is not None:
                on_step(k)
        rec = probe.end_epoch(n)
        for li, lrec in enumerate(rec["layers"]):
            col = [r[li] for r in norms]
            assert close(lrec["grad_norm"]["mean"], sum(col) / len(col)), (n, li)
            assert close(lrec["grad_norm"]["last"], col[-1]), (n, li)
        return rec

    rec = epoch(1)
    assert rec["layers"][0]["grad_norm"]["max"] == 0.0 and fallbacks == []
    for p in weighted[0].parameters():   # unfrozen between epochs
        p.requires_grad_(True)
    rec = epoch(2)
    assert rec["layers"][0]["grad_norm"]["min"] > 0 and fallbacks == []

    def freeze_last_at_step_5(k):
        if k == 5:
            for p in weighted[-1].parameters():
                p.requires_grad_(False)
                p.grad = None

    epoch(3, freeze_last_at_step_5)
    # steps 6 and 7 take the fallback (their plan still expects the gradient); the plan is
    # made again before the sampled step 8, and from there on the fast path is back
    assert len(fallbacks) == 2
    rec = epoch(4)
    assert rec["layers"][-1]["grad_norm"]["max"] == 0.0 and len(fallbacks) == 2


# ----------------------------------------------------------------------------- activations
def act_reference(outs, kind):
    ys = torch.cat([o.reshape(-1).double() for o in outs])
    ref = {"mean": float(ys.mean()), "std": float(ys.std(unbiased=False))}
    if kind == "sigmoid":
        ref["saturated_frac"] = float(((ys < 0.01) | (ys > 0.99)).double().mean())
    elif kind == "tanh":
        ref["saturated_frac"] = float((ys.abs() > 0.99).double().mean())
    else:
        ref["saturated_frac"] = 0.0
    if kind == "relu":
        fr = [float((o <= 0).all(dim=0).double().mean()) for o in outs]
        ref["dead_frac"] = sum(fr) / len(fr)
    else:
        ref["dead_frac"] = 0.0
    return ref


@pytest.mark.parametrize("act,kind", [(nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"),
                                      (nn.ReLU, "relu"), (nn.LeakyReLU, "relu"),
                                      (nn.ELU, "relu"), (nn.Hardtanh, "other")])
@pytest.mark.parametrize("every_step", [False, True])
def test_activation_statistics_match_plain_computation(act, kind, every_step):
    torch.manual_seed(3)
    model = mlp(act, width=8)
    with torch.no_grad():  # push some units into saturation / death
        model.layers[0].linear.weight.mul_(6.0)
        model.layers[0].linear.bias[:3] = -40.0
    acts = [m for m in model.modules() if isinstance(m, act)]
    names = {id(m): n for n, m in model.named_modules()}
    rec_hooks = Recorder(acts)
    probe = Probe(model, every_step=every_step, sample_stride=3)
    stride = probe.sample_stride
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = [(torch.randn(9, 5), torch.randint(0, 3, (9,))) for _ in range(7)]
    run_epoch(model, probe, opt, batches, nn.CrossEntropyLoss())
    with torch.no_grad():  # an evaluation pass must not be counted
        model(torch.randn(50, 5))
    rec = probe.end_epoch(1)
    dumps(rec)
    for li, a in enumerate(acts):
        sampled = [o for k, o in enumerate(rec_hooks.out[id(a)][:7]) if k % stride == 0]
        ref = act_reference(sampled, kind)
        got = rec["layers"][li]["activation"]
        assert got["module"] == names[id(a)]
        for key in ("mean", "std", "saturated_frac", "dead_frac"):
            assert close(got[key], ref[key], rel=1e-4, abs_=1e-6), (key, got[key], ref[key])
    assert rec["layers"][-1]["activation"] is None
    if kind == "relu":
        assert rec["layers"][0]["activation"]["dead_frac"] > 0
    if kind in ("sigmoid", "tanh"):
        assert rec["layers"][0]["activation"]["saturated_frac"] > 0


def test_conv_dead_fraction_over_channel_and_spatial_positions():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with torch.no_grad():
        model[0].bias[0] = -100.0
    rec_hooks = Recorder([model[1]])
    probe = Probe(model, every_step=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(torch.randn(5, 1, 8, 8), torch.randint(0, 2, (5,))) for _ in range(3)]
    run_epoch(model, probe, opt, batches, nn.CrossEntropyLoss())
    rec = probe.end_epoch(1)
    ref = act_reference(rec_hooks.out[id(model[1])], "relu")
    got = rec["layers"][0]["activation"]
    assert got["dead_frac"] >= 0.25
    assert close(got["dead_frac"], ref["dead_frac"]) and close(got["std"], ref["std"], rel=1e-4)


def test_activation_attribution():
    # linear -> batchnorm -> relu: the ReLU runs after the batchnorm (itself a layer with
    # parameters), so it belongs to the batchnorm; a PReLU both is an activation and owns a
    # parameter; only the first activation after a layer counts; a reused module is attributed
    # per call.
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)
            self.act = nn.ReLU()
            self.b = nn.Linear(4, 4)
            self.p = nn.PReLU()
            self.c = nn.Linear(4, 4)
            self.t1 = nn.Tanh()
            self.t2 = nn.Sigmoid()
            self.d = nn.Linear(4, 2)

        def forward(self, x):
            x = self.act(self.bn(self.a(x)))
            x = self.p(self.b(x))
            x = self.t2(self.t1(self.c(x)))
            return self.act(self.d(x))

    model = M()
    probe = Probe(model, every_step=True)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        probe.step()
    rec = probe.end_epoch(1)
    by = {l["name"]: l["activation"] and l["activation"]["module"] for l in rec["layers"]}
    assert by == {"a": None, "bn": "act", "b": "p", "p": None, "c": "t1", "d": "act"}


def test_hooks_registered_only_for_sampled_forwards_and_close_removes_all():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.LSTM(3, 2))
    probe = Probe(model, sample_stride=4)

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    assert n_hooks() > 0  # step 0 is sampled
    seq = model[0]
    for k in range(5):
        seq.zero_grad()
        seq(torch.randn(2, 3)).sum().backward()
        probe.step()
        if k == 0:
            assert len(model[1]._forward_hooks) == 0
    assert len(model[1]._forward_hooks) == 0  # step 5 is not sampled
    probe.close()
    assert n_hooks() == 0


# ----------------------------------------------------------------------------- temporal
class RecNet(nn.Module):
    def __init__(self, cell, inp=3, hidden=5, num_layers=1, batch_first=True, output="last",
                 **kw):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = cls(inp, hidden, num_layers=num_layers, batch_first=batch_first, **kw)
        self.head = nn.Linear(hidden, 1)
        self.output = output
        self.batch_first = batch_first

    def forward(self, x, hx=None):
        out, _ = self.rnn(x, hx)
        if self.output == "sequence":
            return self.head(out).mean(dim=(1 if self.batch_first else 0))
        return self.head(out[:, -1] if self.batch_first else out[-1])


def reference_hidden_grads(net, x, y, hx=None):
    """Unroll with nn.*Cell copies of the weights; ||dL/dh_t|| by torch.autograd.grad."""
    rnn = net.rnn
    mode = rnn.mode
    xs = x.transpose(0, 1)  # x is [B, T, F] whatever the module's layout
    T, B = xs.shape[:2]
    layer_in = list(xs.unbind(0))
    hs = None
    for layer in range(rnn.num_layers):
        kw = dict(bias=rnn.bias)
        if mode == "LSTM":
            cell = nn.LSTMCell(layer_in[0].shape[1], rnn.hidden_size, **kw)
        elif mode == "GRU":
            cell = nn.GRUCell(layer_in[0].shape[1], rnn.hidden_size, **kw)
        else:
            cell = nn.RNNCell(layer_in[0].shape[1], rnn.hidden_size,
                              nonlinearity="tanh" if mode == "RNN_TANH" else "relu", **kw)
        for n in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if rnn.bias else ()):
            getattr(cell, n).data.copy_(getattr(rnn, f"{n}_l{layer}").data)
        if hx is None:
            h = torch.zeros(B, rnn.hidden_size)
            c = torch.zeros(B, rnn.hidden_size)
        else:
            h = (hx[0] if mode == "LSTM" else hx)[layer]
            c = hx[1][layer] if mode == "LSTM" else None
        hs = []
        for t in range(T):
            if mode == "LSTM":
                h, c = cell(layer_in[t], (h, c))
            else:
                h = cell(layer_in[t], h)
            hs.append(h)
        layer_in = hs
    out = torch.stack(hs, 1)
    if net.output == "sequence":
        pred = net.head(out).mean(dim=1)
    else:
        pred = net.head(out[:, -1])
    loss = nn.functional.mse_loss(pred, y)
    grads = torch.autograd.grad(loss, hs)
    return loss, [float(g.norm()) for g in grads]


@pytest.mark.parametrize("cell,kw", [
    ("lstm", {}), ("gru", {}), ("rnn", {}), ("rnn", {"nonlinearity": "relu"}),
    ("lstm", {"num_layers": 2}), ("gru", {"num_layers": 2, "batch_first": False}),
    ("lstm", {"output": "sequence"}), ("rnn", {"bias": False, "output": "sequence"}),
])
def test_temporal_profile_matches_autograd_on_hidden_states(cell, kw):
    torch.manual_seed(5)
    net = RecNet(cell, **kw)
    plain = copy.deepcopy(net)
    probe = Probe(net)
    T = 7
    for epoch in (1, 2):
        x, y = torch.randn(4, T, 3), torch.randn(4, 1)
        hx = None
        if epoch == 2:  # an explicit initial state
            L = net.rnn.num_layers
            hx = ((torch.randn(L, 4, 5), torch.randn(L, 4, 5)) if cell == "lstm"
                  else torch.randn(L, 4, 5))
        ref_loss, ref = reference_hidden_grads(net, x, y, hx)
        x_in = x if net.batch_first else x.transpose(0, 1)
        net.zero_grad()
        plain.load_state_dict(net.state_dict())
        plain.zero_grad()
        loss = nn.functional.mse_loss(net(x_in, hx), y)
        loss.backward()
        probe.step(loss)
        # training unchanged: same loss and parameter gradients as the un-probed model
        plain_loss = nn.functional.mse_loss(plain(x_in, hx), y)
        plain_loss.backward()
        assert close(loss.item(), plain_loss.item(), rel=1e-5)
        assert close(loss.item(), ref_loss.item(), rel=1e-5)
        for p, q in zip(net.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
        # a second batch in the same epoch is not unrolled and does not disturb the profile
        net.zero_grad()
        nn.functional.mse_loss(net(x_in), y).backward()
        probe.step()
        rec = probe.end_epoch(epoch)
        dumps(rec)
        tmp = rec["temporal"]
        assert tmp["layer"] == "rnn" and tmp["wrt"] == "hidden"
        assert len(tmp["grad_norm_by_step"]) == T
        for a, b in zip(tmp["grad_norm_by_step"], ref):
            assert close(a, b, rel=1e-4, abs_=1e-9), (tmp["grad_norm_by_step"], ref)
        with torch.no_grad():
            net.rnn.weight_hh_l0.mul_(1.5)


def input_grad_norms(net, x, y, packed_lengths=None):
    x = x.clone().requires_grad_(True)
    inp = x
    if packed_lengths is not None:
        inp = pack_padded_sequence(x, packed_lengths, batch_first=True, enforce_sorted=False)
    out, _ = net.rnn(inp)
    if packed_lengths is not None:
        pred = net.head(torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
                        [..., :net.rnn.hidden_size].sum(1))
    else:
        pred = net.head(out[:, -1, :net.rnn.hidden_size])
    loss = nn.functional.mse_loss(pred, y)
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_temporal_falls_back_to_input_for_bidirectional_and_packed():
    torch.manual_seed(6)

    class Bi(RecNet):
        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1, :self.rnn.hidden_size])

    net = Bi("lstm", bidirectional=True)
    probe = Probe(net)
    x, y = torch.randn(4, 6, 3), torch.randn(4, 1)
    g = input_grad_norms(net, x, y)
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    probe.step(loss)
    tmp = probe.end_epoch(1)["temporal"]
    assert tmp["wrt"] == "input"
    ref = [float(g[:, t].norm()) for t in range(6)]
    assert tmp["grad_norm_by_step"] == pytest.approx(ref, rel=1e-4)

    class Packed(RecNet):
        def forward(self, x, lengths):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            out = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0]
            return self.head(out.sum(1))

    net = Packed("gru")
    probe = Probe(net)
    lengths = torch.tensor([6, 3, 5, 2])
    g = input_grad_norms(net, x, y, packed_lengths=lengths)
    loss = nn.functional.mse_loss(net(x, lengths), y)
    loss.backward()
    probe.step(loss)
    tmp = probe.end_epoch(1)["temporal"]
    assert tmp["wrt"] == "input"
    ref = [float(g[:, t].norm()) for t in range(6)]
    assert tmp["grad_norm_by_step"] == pytest.approx(ref, rel=1e-4)


def test_temporal_waits_for_a_training_batch():
    torch.manual_seed(7)
    net = RecNet("lstm")
    probe = Probe(net)
    with torch.no_grad():
        net(torch.randn(2, 4, 3))  # evaluation: not the sampled batch
    net(torch.randn(2, 4, 3))      # forward whose backward never runs
    x, y = torch.randn(3, 4, 3), torch.randn(3, 1)
    _, ref = reference_hidden_grads(net, x, y)
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    probe.step(loss)
    tmp = probe.end_epoch(1)["temporal"]
    assert tmp["grad_norm_by_step"] == pytest.approx(ref, rel=1e-4)
    assert probe.end_epoch(2)["temporal"] is None  # no batch in epoch 2
    assert Probe(mlp()).end_epoch(1)["temporal"] is None


# ----------------------------------------------------------------------------- package hygiene
def test_sdk_imports_only_torch_httpx_and_stdlib():
    allowed = {"torch", "httpx", "gradwatch", "__future__"} | set(sys.stdlib_module_names)
    for path in (ROOT / "gradwatch").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] in allowed, f"{path.name} imports {mod}"


def test_heterogeneous_layers_grouped_and_packed(layout):
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 300), nn.Tanh(), nn.Linear(300, 2), nn.Linear(2, 2, bias=False))
    weighted = [m for m in model.modules() if list(m.parameters(recurse=False))]
    probe = Probe(model, every_step=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = [(torch.randn(4, 1, 6, 6), torch.randint(0, 2, (4,))) for _ in range(3)]
    norms, maxabs = [], []

    def on_grads(k):
        norms.append([layer_norm_now(m) for m in weighted])
        maxabs.append([layer_maxabs_now(m) for m in weighted])

    run_epoch(model, probe, opt, batches, nn.CrossEntropyLoss(), on_grads=on_grads)
    rec = probe.end_epoch(1)
    assert [l["type"] for l in rec["layers"]] == ["conv2d", "batchnorm2d", "linear", "linear",
                                                  "linear"]
    for li, lrec in enumerate(rec["layers"]):
        col = [r[li] for r in norms]
        assert close(lrec["grad_norm"]["first"], col[0])
        assert close(lrec["grad_norm"]["mean"], sum(col) / len(col))
        assert close(lrec["grad_max_abs"], max(r[li] for r in maxabs))
