"""Remedies: ranked recommendations, each tied to the causes it treats.

For spec jobs every recommendation carries an RFC 6902 patch (``jsonpatch`` semantics) against
the spec exactly as submitted -- inside ``repeat`` and ``residual`` blocks too -- and a patch is
only offered when the patched spec passes ``models.validation.check_spec``. For external jobs
(no spec) ``patch`` is null and ``code`` says the concrete change in words.

Catalogue (Glorot & Bengio 2010; He et al. 2015; Pascanu et al. 2013; Hochreiter & Schmidhuber
1997; Cho et al. 2014; Saxe et al. 2014; Le et al. 2015; Ioffe & Szegedy 2015; Ba et al. 2016;
He et al. 2016a/b; Maas et al. 2013; Hendrycks & Gimpel 2016):

  id                          treats
  use_relu_he_init            saturating sigmoid/tanh -> ReLU + He init (a saturating activation
                              on a residual trunk is replaced by identity instead)
  use_he_init                 init scale of ReLU-family layers (too small: vanishing; too large:
                              exploding)
  use_xavier_init             init scale of tanh/sigmoid layers
  use_leaky_relu              dead ReLUs -> LeakyReLU + matching He init
  break_symmetry              zero/constant init -> a random init matching the activation
  lower_learning_rate         a too-high learning rate (divergence, NaN, oscillation)
  clip_gradients              gradient clipping by norm
  orthogonal_recurrent_init   recurrent Jacobian spectral radius far from 1
  gated_recurrent_cell        vanilla RNN -> LSTM (with orthogonal recurrent init)
  sequence_readout            read every time step out (output: sequence + flatten): shortens the
                              path from the loss to early steps
  add_batch_norm              batch normalisation after hidden weighted layers
  add_layer_norm              layer normalisation after hidden linear layers
  add_residual                wrap the repeated block in a residual connection
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import jsonpatch

SATURATING = {"sigmoid", "tanh"}
RELU_FAMILY = {"relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "softplus"}
ACTIVATIONS = SATURATING | RELU_FAMILY | {"identity"}
WEIGHTED = {"linear", "conv2d", "rnn"}
ADAPTIVE_OPTIMIZERS = {"adam", "adamw", "rmsprop"}


# ------------------------------------------------------------------------------ spec walking
@dataclass
class Node:
    pointer: str            # JSON pointer of the layer object
    layer: dict
    parent: str             # pointer of the list that holds it
    index: int
    container: str | None   # "repeat" | "residual" | None (type of the enclosing block)
    in_residual: bool       # somewhere inside a residual branch
    prev_sibling: dict | None


def walk(spec: dict) -> list[Node]:
    """Layers of the spec in forward order (a repeat's body once), with their pointers."""
    out: list[Node] = []

    def rec(layers: Any, base: str, container: str | None, in_res: bool) -> None:
        if not isinstance(layers, list):
            return
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                continue
            p = f"{base}/{i}"
            prev = layers[i - 1] if i > 0 and isinstance(layers[i - 1], dict) else None
            out.append(Node(p, layer, base, i, container, in_res, prev))
            t = layer.get("type")
            if t in ("repeat", "residual"):
                rec(layer.get("layers"), p + "/layers", t, in_res or t == "residual")

    rec(((spec or {}).get("network") or {}).get("layers"), "/network/layers", None, False)
    return out


def pointer_of(spec: dict, name: str) -> str | None:
    """JSON pointer of the spec layer a module name refers to (docs/architecture.md naming)."""
    tokens = name.split(".")
    layers = ((spec or {}).get("network") or {}).get("layers")
    base, i = "/network/layers", 0
    if not tokens or tokens[0] != "layers":
        return None
    i = 1
    while i < len(tokens):
        try:
            idx = int(tokens[i])
        except ValueError:
            return None
        if not isinstance(layers, list) or idx >= len(layers):
            return None
        layer = layers[idx]
        p = f"{base}/{idx}"
        t = layer.get("type")
        i += 1
        if t == "repeat":
            i += 1  # repetition index
        if t in ("repeat", "residual") and i < len(tokens) and tokens[i] == "layers":
            layers, base = layer.get("layers"), p + "/layers"
            i += 1
            continue
        return p
    return None


def _activation_after(nodes: list[Node], k: int) -> Node | None:
    """The first activation after weighted node k, before the next weighted layer."""
    for node in nodes[k + 1:]:
        t = node.layer.get("type")
        if t in WEIGHTED:
            return None
        if t in ACTIVATIONS:
            return node
    return None


def _weighted_before(nodes: list[Node], k: int) -> Node | None:
    for node in reversed(nodes[:k]):
        if node.layer.get("type") in WEIGHTED:
            return node
        if node.layer.get("type") in ("residual",):
            continue
    return None


def _dedupe(ops: list[dict]) -> list[dict]:
    """Drop repeated operations (several activations may share one preceding layer)."""
    seen: set[str] = set()
    out = []
    for op in ops:
        key = repr(sorted(op.items()))
        if key not in seen:
            seen.add(key)
            out.append(op)
    return out


def _he_init_for(act: str, act_layer: dict) -> dict:
    if act == "leaky_relu":
        return {"name": "kaiming_normal", "nonlinearity": "leaky_relu",
                "a": float(act_layer.get("negative_slope", 0.01))}
    if act == "prelu":
        return {"name": "kaiming_normal", "nonlinearity": "leaky_relu", "a": 0.25}
    if act == "selu":
        return {"name": "kaiming_normal", "nonlinearity": "selu"}
    return {"name": "kaiming_normal", "nonlinearity": "relu"}


def _xavier_for(act: str) -> dict:
    return {"name": "xavier_normal", "gain": round(5.0 / 3.0, 4)} if act == "tanh" else {"name": "xavier_normal"}


def _set(layer: dict, pointer: str, key: str, value: Any) -> dict:
    op = "replace" if key in layer else "add"
    return {"op": op, "path": f"{pointer}/{key}", "value": value}


def _last_weighted_in_residual_branch(nodes: list[Node], node: Node) -> bool:
    """True for the last weighted layer of a residual branch (kept small: He et al. 2016)."""
    if node.container != "residual":
        return False
    siblings = [n for n in nodes if n.parent == node.parent and n.layer.get("type") in WEIGHTED]
    return bool(siblings) and siblings[-1].pointer == node.pointer and len(siblings) > 1


# ------------------------------------------------------------------------------ patch builders
def _patch_relu_he(spec: dict) -> list[dict]:
    nodes = walk(spec)
    ops: list[dict] = []
    for k, node in enumerate(nodes):
        t = node.layer.get("type")
        if t not in SATURATING:
            continue
        if node.prev_sibling is not None and node.prev_sibling.get("type") == "residual":
            # an activation on the trunk: the skip path itself goes through sigma'; remove it.
            ops.append({"op": "replace", "path": f"{node.pointer}/type", "value": "identity"})
            continue
        ops.append({"op": "replace", "path": f"{node.pointer}/type", "value": "relu"})
        w = _weighted_before(nodes, k)
        if w is not None and w.layer.get("type") in ("linear", "conv2d"):
            if not _last_weighted_in_residual_branch(nodes, w):
                ops.append(_set(w.layer, w.pointer, "init", {"name": "kaiming_normal", "nonlinearity": "relu"}))
    if any(op["value"] == "relu" for op in ops):
        ops += _lr_guard(spec)
    return _dedupe(ops)


def _patch_init(spec: dict, family: str) -> list[dict]:
    """He init before ReLU-family activations (family 'he') or Xavier before tanh/sigmoid ('xavier')."""
    nodes = walk(spec)
    ops: list[dict] = []
    for k, node in enumerate(nodes):
        if node.layer.get("type") not in ("linear", "conv2d"):
            continue
        act = _activation_after(nodes, k)
        if act is None or _last_weighted_in_residual_branch(nodes, node):
            continue
        a = act.layer.get("type")
        if family == "he" and a in RELU_FAMILY:
            ops.append(_set(node.layer, node.pointer, "init", _he_init_for(a, act.layer)))
        elif family == "xavier" and a in SATURATING:
            ops.append(_set(node.layer, node.pointer, "init", _xavier_for(a)))
    if ops:
        ops += _lr_guard(spec)
    return ops


def _patch_leaky(spec: dict) -> list[dict]:
    nodes = walk(spec)
    ops: list[dict] = []
    for k, node in enumerate(nodes):
        if node.layer.get("type") != "relu":
            continue
        ops.append({"op": "replace", "path": f"{node.pointer}/type", "value": "leaky_relu"})
        ops.append({"op": "add", "path": f"{node.pointer}/negative_slope", "value": 0.1})
        w = _weighted_before(nodes, k)
        if w is not None and w.layer.get("type") in ("linear", "conv2d") and not _last_weighted_in_residual_branch(nodes, w):
            ops.append(_set(w.layer, w.pointer, "init",
                            {"name": "kaiming_normal", "nonlinearity": "leaky_relu", "a": 0.1}))
            if _negative_bias(w.layer.get("bias_init")):
                # a negative bias holds the unit below zero for every input: it never fires
                ops.append({"op": "replace", "path": f"{w.pointer}/bias_init", "value": "zeros"})
    if ops:
        ops += _lr_guard(spec)
    return _dedupe(ops)


def _negative_bias(init: Any) -> bool:
    if not isinstance(init, dict):
        return False
    if init.get("name") == "constant":
        return float(init.get("value", 0)) < 0
    if init.get("name") == "normal":
        return float(init.get("mean", 0)) < 0
    if init.get("name") == "uniform":
        return float(init.get("b", 1)) <= 0
    return False


def _patch_break_symmetry(spec: dict) -> list[dict]:
    nodes = walk(spec)
    ops: list[dict] = []
    for k, node in enumerate(nodes):
        t = node.layer.get("type")
        if t not in WEIGHTED:
            continue
        for key in ("init", "recurrent_init"):
            init = node.layer.get(key)
            name = init.get("name") if isinstance(init, dict) else init
            if name not in ("zeros", "ones", "constant"):
                continue
            if t == "rnn":
                new = {"name": "orthogonal"} if key == "recurrent_init" else {"name": "xavier_uniform"}
            else:
                act = _activation_after(nodes, k)
                a = act.layer.get("type") if act is not None else None
                if a in RELU_FAMILY:
                    new = _he_init_for(a, act.layer)
                elif a in SATURATING:
                    new = _xavier_for(a)
                else:
                    new = "default"
            ops.append({"op": "replace", "path": f"{node.pointer}/{key}", "value": new})
    if ops:
        ops += _lr_guard(spec)
    return ops


def _lr_value(spec: dict) -> float | None:
    lr = ((spec or {}).get("training") or {}).get("lr", 0.01)
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def _optimizer_name(spec: dict) -> str:
    opt = ((spec or {}).get("training") or {}).get("optimizer", "sgd")
    return (opt.get("name") if isinstance(opt, dict) else opt) or "sgd"


def _momentum(spec: dict) -> float:
    opt = ((spec or {}).get("training") or {}).get("optimizer")
    m = opt.get("momentum") if isinstance(opt, dict) else None
    return float(m) if isinstance(m, (int, float)) and not isinstance(m, bool) else 0.0


def weighted_depth(spec: dict) -> int:
    """Weighted layers on the forward path (repeats expanded, a recurrent layer unrolled over the
    sequence: it is applied once per time step)."""
    data = (spec or {}).get("data") or {}
    steps = int(data.get("seq_len", 20)) if data.get("name") == "adding" else 1

    def count(layers: Any) -> int:
        n = 0
        for layer in layers if isinstance(layers, list) else []:
            if not isinstance(layer, dict):
                continue
            t = layer.get("type")
            if t == "repeat":
                n += int(layer.get("times", 1)) * count(layer.get("layers"))
            elif t == "residual":
                n += count(layer.get("layers"))
            elif t == "rnn":
                n += steps * int(layer.get("num_layers", 1))
            elif t in WEIGHTED:
                n += 1
        return n
    return max(1, count(((spec or {}).get("network") or {}).get("layers")))


def lr_cap(spec: dict) -> float:
    """The largest learning rate we recommend for this optimizer and depth.

    Adaptive optimizers move every weight by ~lr per step whatever the gradient scale (Kingma &
    Ba 2015): 2e-3. SGD: the effective step lr/(1-momentum) at most 1/L for L weighted layers --
    at a variance-preserving init every layer adds an O(1) term to the neural tangent kernel
    (Jacot et al. 2018), so the loss curvature grows ~L and the stable step shrinks ~1/L.
    """
    if _optimizer_name(spec) in ADAPTIVE_OPTIMIZERS:
        return 2e-3
    return (1.0 - _momentum(spec)) / weighted_depth(spec)


def _new_lr(spec: dict) -> float | None:
    lr = _lr_value(spec)
    if lr is None:
        return None
    return float(f"{min(lr / 10.0, lr_cap(spec)):.3g}")


def _lr_guard(spec: dict) -> list[dict]:
    """With plain SGD, a learning rate tuned to vanishing (or wild) gradients overshoots once the
    gradients are restored: bring it within lr_cap. Adaptive optimizers need no change."""
    if _optimizer_name(spec) in ADAPTIVE_OPTIMIZERS:
        return []
    lr, cap = _lr_value(spec), lr_cap(spec)
    if lr is None or lr <= cap:
        return []
    training = (spec or {}).get("training")
    new = float(f"{cap:.3g}")
    if not isinstance(training, dict):
        return [{"op": "add", "path": "/training", "value": {"lr": new}}]
    return [_set(training, "/training", "lr", new)]


def _patch_lower_lr(spec: dict) -> list[dict]:
    training = (spec or {}).get("training")
    new = _new_lr(spec)
    if new is None:
        return []
    if not isinstance(training, dict):
        return [{"op": "add", "path": "/training", "value": {"lr": new}}]
    return [_set(training, "/training", "lr", new)]


def _patch_clip(spec: dict, max_norm: float = 1.0) -> list[dict]:
    training = (spec or {}).get("training")
    if not isinstance(training, dict):
        return [{"op": "add", "path": "/training", "value": {"grad_clip": {"max_norm": max_norm}}}]
    clip = training.get("grad_clip")
    if isinstance(clip, dict) and clip.get("max_norm") is not None and clip["max_norm"] <= max_norm:
        return []
    return [_set(training, "/training", "grad_clip", {"max_norm": max_norm})]


def _recurrent_nodes(spec: dict) -> list[Node]:
    return [n for n in walk(spec) if n.layer.get("type") == "rnn"]


def _patch_orthogonal(spec: dict, with_clip: bool = True) -> list[dict]:
    ops: list[dict] = []
    for node in _recurrent_nodes(spec):
        cur = node.layer.get("recurrent_init")
        name = cur.get("name") if isinstance(cur, dict) else cur
        gain = cur.get("gain", 1.0) if isinstance(cur, dict) else 1.0
        # ReLU halves the state's energy at every step: gain sqrt(2) keeps it, as He init does
        # across layers (Talathi & Vartak 2016; Le et al. 2015 for the identity variant)
        relu = node.layer.get("cell", "rnn") == "rnn" and node.layer.get("nonlinearity") == "relu"
        want = {"name": "orthogonal", "gain": 1.4142} if relu else {"name": "orthogonal"}
        if name == "orthogonal" and gain == want.get("gain", 1.0):
            continue
        ops.append(_set(node.layer, node.pointer, "recurrent_init", want))
    if ops and with_clip:
        ops += _patch_clip(spec)
    if ops:
        # a ReLU cell's state is unbounded: smaller steps (Le et al. 2015 trained IRNNs slowly)
        relu_cell = any(n.layer.get("cell", "rnn") == "rnn" and n.layer.get("nonlinearity") == "relu"
                        for n in _recurrent_nodes(spec))
        ops += _recurrent_optimizer(spec, 0.002 if relu_cell else 0.005)
    return ops


def _recurrent_optimizer(spec: dict, lr: float = 0.005) -> list[dict]:
    """Plain SGD cannot follow the gradient of a recurrent net whose per-step gradients differ
    by orders of magnitude; Adam's per-parameter scaling can (the measured fixes of
    benchmark/README.md 01 and 08 use Adam at 2e-3..5e-3)."""
    if _optimizer_name(spec) != "sgd":
        return []
    return _adam_ops(spec, lr)


def _patch_gated(spec: dict) -> list[dict]:
    ops: list[dict] = []
    for node in _recurrent_nodes(spec):
        if node.layer.get("cell", "rnn") != "rnn":
            continue
        ops.append(_set(node.layer, node.pointer, "cell", "lstm"))
        if "nonlinearity" in node.layer:
            ops.append({"op": "remove", "path": f"{node.pointer}/nonlinearity"})
        ops.append(_set(node.layer, node.pointer, "recurrent_init", {"name": "orthogonal"}))
    if ops:
        ops += _patch_clip(spec) + _recurrent_optimizer(spec)
    return ops


def _patch_sequence_readout(spec: dict) -> list[dict]:
    """output: sequence + flatten right after the (top-level) recurrent layer."""
    ops: list[dict] = []
    layers = ((spec or {}).get("network") or {}).get("layers") or []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or layer.get("type") != "rnn" or layer.get("output") == "sequence":
            continue
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if not isinstance(nxt, dict) or nxt.get("type") != "linear":
            continue
        ops.append(_set(layer, f"/network/layers/{i}", "output", "sequence"))
        ops.append({"op": "add", "path": f"/network/layers/{i + 1}", "value": {"type": "flatten"}})
        break  # one insertion: later indices would shift
    if ops:
        ops += _recurrent_optimizer(spec)
    return ops


def _patch_lstm_readout(spec: dict) -> list[dict]:
    """A vanilla RNN becomes an LSTM (orthogonal recurrent init) read out at every step."""
    layers = ((spec or {}).get("network") or {}).get("layers") or []
    ops: list[dict] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or layer.get("type") != "rnn" or layer.get("cell", "rnn") != "rnn":
            continue
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if not isinstance(nxt, dict) or nxt.get("type") != "linear" or layer.get("output") == "sequence":
            continue
        p = f"/network/layers/{i}"
        ops.append(_set(layer, p, "cell", "lstm"))
        if "nonlinearity" in layer:
            ops.append({"op": "remove", "path": f"{p}/nonlinearity"})
        ops.append(_set(layer, p, "recurrent_init", {"name": "orthogonal"}))
        ops.append(_set(layer, p, "output", "sequence"))
        ops.append({"op": "add", "path": f"/network/layers/{i + 1}", "value": {"type": "flatten"}})
        break
    if ops:
        ops += _recurrent_optimizer(spec)
    return ops


def _adam_ops(spec: dict, lr: float = 0.005) -> list[dict]:
    training = spec.get("training")
    if not isinstance(training, dict):
        return [{"op": "add", "path": "/training", "value": {"optimizer": "adam", "lr": lr}}]
    return [_set(training, "/training", "optimizer", "adam"), _set(training, "/training", "lr", lr)]


def _patch_norm(spec: dict, kind: str) -> list[dict]:
    """Insert a norm layer right after every hidden weighted layer (before its activation)."""
    nodes = walk(spec)
    inserts: dict[str, list[int]] = {}
    for k, node in enumerate(nodes):
        t = node.layer.get("type")
        if t not in ("linear", "conv2d") or _activation_after(nodes, k) is None:
            continue
        if kind == "layer_norm" and t != "linear":
            continue
        nxt = None
        # skip if a norm layer already follows
        for other in nodes[k + 1:k + 2]:
            nxt = other.layer.get("type")
        if nxt in ("batch_norm", "layer_norm"):
            continue
        inserts.setdefault(node.parent, []).append(node.index + 1)
    paths = [f"{parent}/{idx}" for parent, idxs in inserts.items() for idx in idxs]
    # apply from the back of the document: an insertion never shifts a path that comes later
    paths.sort(key=_path_key, reverse=True)
    return [{"op": "add", "path": p, "value": {"type": kind}} for p in paths]


def _path_key(path: str) -> tuple:
    return tuple(int(t) for t in path.split("/") if t.isdigit())


def _patch_residual(spec: dict) -> list[dict]:
    """Wrap each repeat's body (weighted + activation) in a residual block."""
    ops: list[dict] = []
    for node in walk(spec):
        if node.layer.get("type") != "repeat":
            continue
        body = node.layer.get("layers") or []
        if any(isinstance(x, dict) and x.get("type") == "residual" for x in body):
            continue
        if not any(isinstance(x, dict) and x.get("type") in WEIGHTED for x in body):
            continue
        ops.append({"op": "replace", "path": f"{node.pointer}/layers",
                    "value": [{"type": "residual", "layers": copy.deepcopy(body)}]})
    return ops


# ------------------------------------------------------------------------------ catalogue
@dataclass
class Remedy:
    id: str
    title: str
    addresses: list[str]
    build: Callable[[dict], list[dict]]
    code: str


CATALOGUE: dict[str, Remedy] = {r.id: r for r in [
    Remedy("use_relu_he_init", "Replace sigmoid/tanh by ReLU with He (Kaiming) init",
           ["vanishing_gradients", "saturated_activations"], _patch_relu_he,
           "replace nn.Sigmoid()/nn.Tanh() by nn.ReLU() and initialise the layer before it with "
           "nn.init.kaiming_normal_(layer.weight, nonlinearity=\"relu\"); nn.init.zeros_(layer.bias)"),
    Remedy("use_he_init", "He (Kaiming) initialisation for the ReLU-family layers",
           ["vanishing_gradients", "exploding_gradients"], lambda s: _patch_init(s, "he"),
           "for every layer followed by a ReLU-family activation: "
           "nn.init.kaiming_normal_(layer.weight, nonlinearity=\"relu\") "
           "(nonlinearity=\"leaky_relu\", a=slope for LeakyReLU)"),
    Remedy("use_xavier_init", "Xavier (Glorot) initialisation for the tanh/sigmoid layers",
           ["vanishing_gradients", "exploding_gradients", "saturated_activations"],
           lambda s: _patch_init(s, "xavier"),
           "for every layer followed by tanh/sigmoid: nn.init.xavier_normal_(layer.weight, "
           "gain=nn.init.calculate_gain(\"tanh\"))"),
    Remedy("use_leaky_relu", "Replace ReLU by LeakyReLU (slope 0.1) with matching He init",
           ["dead_relu", "vanishing_gradients"], _patch_leaky,
           "replace nn.ReLU() by nn.LeakyReLU(0.1) and initialise the layer before it with "
           "nn.init.kaiming_normal_(layer.weight, nonlinearity=\"leaky_relu\", a=0.1)"),
    Remedy("break_symmetry", "Break the zero/constant-init symmetry with a random init",
           ["symmetric_weights", "vanishing_gradients"], _patch_break_symmetry,
           "do not initialise weights to zeros/constants: use nn.init.kaiming_normal_(layer.weight, "
           "nonlinearity=\"relu\") (ReLU family) or nn.init.xavier_normal_(layer.weight) (tanh/sigmoid); "
           "biases may stay zero"),
    Remedy("lower_learning_rate", "Lower the learning rate",
           ["exploding_gradients", "loss_divergence", "nonfinite_loss", "loss_oscillation"],
           _patch_lower_lr,
           "divide the learning rate by 10: for g in optimizer.param_groups: g[\"lr\"] /= 10 "
           "(for Adam/RMSprop use about 1e-3)"),
    Remedy("clip_gradients", "Clip the gradient norm",
           ["exploding_gradients", "nonfinite_loss", "loss_divergence"], _patch_clip,
           "after loss.backward(): torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)"),
    Remedy("orthogonal_recurrent_init", "Orthogonal recurrent weights (with gradient clipping)",
           ["exploding_gradients", "vanishing_gradients"], _patch_orthogonal,
           "for name, p in rnn.named_parameters(): if \"weight_hh\" in name: nn.init.orthogonal_(p); "
           "and clip_grad_norm_(model.parameters(), 1.0)"),
    Remedy("gated_recurrent_cell", "Use an LSTM instead of a vanilla RNN (orthogonal recurrent init)",
           ["vanishing_gradients", "exploding_gradients"], _patch_gated,
           "replace nn.RNN(...) by nn.LSTM(...) (or nn.GRU), initialise weight_hh with "
           "nn.init.orthogonal_ and clip the gradient norm to 1.0"),
    Remedy("sequence_readout", "Read the output from every time step",
           ["vanishing_gradients"], _patch_sequence_readout,
           "use the whole output sequence: out, _ = rnn(x); y = head(out.flatten(1)) "
           "(nn.Linear(T*hidden, outputs)) instead of out[:, -1]"),
    Remedy("lstm_sequence_readout", "Use an LSTM and read the output from every time step",
           ["vanishing_gradients"], _patch_lstm_readout,
           "replace nn.RNN(...) by nn.LSTM(...) (weight_hh orthogonal) and use the whole output "
           "sequence: out, _ = lstm(x); y = head(out.flatten(1)); train it with Adam (lr ~5e-3)"),
    Remedy("add_batch_norm", "Add batch normalisation after the hidden layers",
           ["vanishing_gradients", "exploding_gradients", "saturated_activations"],
           lambda s: _patch_norm(s, "batch_norm"),
           "insert nn.BatchNorm1d/2d(features) after every hidden Linear/Conv2d, before its activation"),
    Remedy("add_layer_norm", "Add layer normalisation after the hidden linear layers",
           ["vanishing_gradients", "exploding_gradients"], lambda s: _patch_norm(s, "layer_norm"),
           "insert nn.LayerNorm(features) after every hidden Linear, before its activation"),
    Remedy("add_residual", "Add residual (skip) connections around the repeated blocks",
           ["vanishing_gradients"], _patch_residual,
           "make each repeated block compute x + f(x) (same width in and out)"),
]}


RATIONALES: dict[tuple[str, str], str] = {
    ("use_relu_he_init", "saturation"):
        "Saturated sigmoid/tanh units have a derivative near 0 (sigmoid' <= 0.25 at best), so each "
        "layer multiplies the backward signal by a small factor (Glorot & Bengio 2010); ReLU passes "
        "a derivative of 1 and He init keeps the signal's variance constant through depth.",
    ("use_relu_he_init", "init_scale_small"):
        "The net's saturating activations shrink the backward signal at every layer; ReLU with He "
        "init keeps its variance constant through depth (He et al. 2015).",
    ("use_he_init", "init_scale_small"):
        "The weights are too small for the ReLU-family activations: each layer scales the backward "
        "signal by less than 1, so it shrinks geometrically with depth; He init (variance 2/fan_in) "
        "makes that gain 1 (He et al. 2015).",
    ("use_he_init", "init_scale"):
        "The weights are too large: activations and gradients grow by a constant factor per layer "
        "and overflow; He init (variance 2/fan_in) makes the per-layer gain 1 (He et al. 2015).",
    ("use_xavier_init", "init_scale_small"):
        "The tanh/sigmoid layers' weights are scaled so the backward signal shrinks with depth; "
        "Xavier init balances forward and backward variance (Glorot & Bengio 2010).",
    ("use_xavier_init", "init_scale"):
        "The tanh/sigmoid layers' weights are too large: units saturate and gradients grow; Xavier "
        "init balances forward and backward variance (Glorot & Bengio 2010).",
    ("use_leaky_relu", "dead_relu"):
        "Most ReLU units output 0 for every input and pass no gradient; a leaky slope keeps a "
        "gradient flowing through inactive units (Maas et al. 2013).",
    ("break_symmetry", "symmetry"):
        "With all weights equal every unit of a layer computes the same function and receives the "
        "same gradient, and zero weights pass no gradient to earlier layers; a random init breaks "
        "the symmetry.",
    ("lower_learning_rate", "learning_rate"):
        "Gradients were normal at initialisation and the loss blew up once training started: the "
        "steps overshoot the curvature of the loss, so a smaller learning rate is the direct fix.",
    ("clip_gradients", "learning_rate"):
        "Clipping bounds the size of each step when the gradient spikes (Pascanu et al. 2013).",
    ("clip_gradients", "recurrent"):
        "Clipping the gradient norm stops the steps that the exploding gradient through time "
        "would otherwise take (Pascanu et al. 2013).",
    ("orthogonal_recurrent_init", "recurrent"):
        "The recurrent weight matrix has a spectral radius far above 1, so dL/dh_t grows by that "
        "factor per step back in time (Pascanu et al. 2013); an orthogonal matrix has every "
        "singular value 1 (Saxe et al. 2014; Le et al. 2015), and clipping catches what remains.",
    ("orthogonal_recurrent_init", "recurrent_vanishing"):
        "The recurrent Jacobian shrinks dL/dh_t at every step back in time; orthogonal recurrent "
        "weights keep its singular values at 1 (Saxe et al. 2014; Le et al. 2015).",
    ("gated_recurrent_cell", "recurrent_vanishing"):
        "A vanilla RNN multiplies the gradient by the recurrent Jacobian at every step; the LSTM's "
        "additive cell state carries it across many steps (Hochreiter & Schmidhuber 1997).",
    ("gated_recurrent_cell", "recurrent"):
        "An LSTM's gates bound the hidden state, so the gradient through time cannot grow "
        "geometrically (Hochreiter & Schmidhuber 1997).",
    ("lstm_sequence_readout", "recurrent_vanishing"):
        "The vanilla RNN multiplies dL/dh_t by its recurrent Jacobian at every step back in time, "
        "so early steps get no gradient; an LSTM carries its state additively (Hochreiter & "
        "Schmidhuber 1997) and reading every step out gives each step a direct path to the loss.",
    ("lstm_sequence_readout", "*"):
        "An LSTM read out at every step gives every time step a short path to the loss.",
    ("sequence_readout", "recurrent_vanishing"):
        "The gradient reaching the early time steps has to cross every later step; reading the "
        "output from every step gives each step a direct path to the loss, so early inputs get "
        "gradient even where the recurrence attenuates it.",
    ("add_batch_norm", "*"):
        "Normalising each hidden layer's pre-activations keeps them at unit scale whatever the "
        "weights' scale, so gradients neither shrink nor grow with depth (Ioffe & Szegedy 2015).",
    ("add_layer_norm", "*"):
        "Normalising each hidden layer keeps its scale fixed through depth (Ba et al. 2016).",
    ("add_residual", "*"):
        "A skip connection gives the gradient an identity path around each block, so it reaches "
        "early layers undiminished (He et al. 2016).",
    ("use_relu_he_init", "*"):
        "Sigmoid/tanh derivatives are at most 0.25/1 and near 0 when saturated; ReLU with He init "
        "keeps the gradient's scale through depth (Glorot & Bengio 2010; He et al. 2015).",
    ("use_he_init", "*"):
        "He init sets each ReLU-family layer's gain to 1, so gradients keep their scale with depth "
        "(He et al. 2015).",
    ("use_xavier_init", "*"):
        "Xavier init keeps tanh/sigmoid layers out of saturation and balances the gradient's "
        "variance across layers (Glorot & Bengio 2010).",
    ("lower_learning_rate", "*"):
        "A smaller step size keeps updates within the region where the loss surface is well "
        "approximated by its gradient.",
    ("clip_gradients", "*"):
        "Clipping bounds the size of a step when the gradient spikes (Pascanu et al. 2013).",
    ("orthogonal_recurrent_init", "*"):
        "Orthogonal recurrent weights keep the recurrent Jacobian's singular values near 1 "
        "(Saxe et al. 2014).",
    ("gated_recurrent_cell", "*"):
        "Gated cells keep an additive path for the gradient through time (Hochreiter & Schmidhuber 1997).",
    ("sequence_readout", "*"):
        "Reading out every step gives early steps a direct path to the loss.",
    ("use_leaky_relu", "*"):
        "A leaky slope keeps gradient flowing through units that are inactive (Maas et al. 2013).",
    ("break_symmetry", "*"):
        "A random init makes each unit compute a different function.",
}


# order of remedies by the cause found (models.diagnosis.cause)
ORDER: dict[str, list[str]] = {
    "saturation": ["use_relu_he_init", "use_xavier_init", "add_batch_norm", "add_residual"],
    "init_scale_small": ["use_he_init", "use_relu_he_init", "use_xavier_init", "add_batch_norm",
                         "add_residual"],
    "init_scale": ["use_he_init", "use_xavier_init", "add_batch_norm", "clip_gradients",
                   "lower_learning_rate"],
    "learning_rate": ["lower_learning_rate", "clip_gradients", "add_batch_norm"],
    "recurrent": ["orthogonal_recurrent_init", "gated_recurrent_cell", "clip_gradients",
                  "lower_learning_rate"],
    "recurrent_vanishing": ["sequence_readout", "gated_recurrent_cell", "orthogonal_recurrent_init"],
    "symmetry": ["break_symmetry", "use_he_init", "use_xavier_init"],
    "dead_relu": ["use_leaky_relu", "use_he_init", "lower_learning_rate", "add_batch_norm"],
}


def _order_for(cause: str, a: Any) -> list[str]:
    order = list(ORDER.get(cause, []))
    if cause == "recurrent_vanishing" and a is not None and any(
            t == "rnn" for t in a.layer_types.values()):
        # a vanilla cell: its state decays geometrically, a readout alone does not make it learn
        order = ["lstm_sequence_readout"] + order
    if cause == "init_scale_small" and a is not None and a.saturated:
        order = ["use_relu_he_init"] + [x for x in order if x != "use_relu_he_init"]
    return order


def _validates(spec: dict, patch: list[dict]) -> bool:
    try:
        patched = jsonpatch.apply_patch(spec, patch)
    except Exception:
        return False
    try:
        from models.validation import Limits, check_spec
    except Exception:  # validation not importable: trust the structural patch
        return True
    try:
        check_spec(patched, Limits())
    except Exception:
        return False
    return True


def _spec_kind(spec: dict) -> set[str]:
    return {n.layer.get("type") for n in walk(spec)}


def recommend(a: Any, findings: list[dict], *, spec: dict | None = None) -> list[dict]:
    """Ranked recommendations for an analysis (models.diagnosis.Analysis)."""
    from models.diagnosis import cause as cause_of

    kinds = {f["kind"] for f in findings}
    c = cause_of(a)
    if a.verdict == "healthy":
        # something minor only
        order: list[str] = []
        if "loss_oscillation" in kinds:
            order.append("lower_learning_rate")
        if any(f["kind"] == "dead_relu" and f["severity"] != "low" for f in findings):
            order.append("use_leaky_relu")
        if any(f["kind"] == "saturated_activations" and f["severity"] != "low" for f in findings):
            order.append("use_xavier_init")
        if "symmetric_weights" in kinds:
            order.append("break_symmetry")
        c = "*"
    else:
        order = _order_for(c, a)
        if "symmetric_weights" in kinds and "break_symmetry" not in order:
            order.insert(0, "break_symmetry")
    is_spec = isinstance(spec, dict) and isinstance(spec.get("network"), dict)
    types = _spec_kind(spec) if is_spec else set(getattr(a, "layer_types", {}).values())
    out: list[dict] = []
    for rid in order:
        r = CATALOGUE[rid]
        if not _applicable(rid, types, a):
            continue
        rationale = RATIONALES.get((rid, c)) or RATIONALES[(rid, "*")]
        if is_spec:
            patch = r.build(spec)
            if not patch or not _validates(spec, patch):
                continue
            code = None
        else:
            patch, code = None, r.code
        addresses = [k for k in r.addresses if k in kinds] or [k for k in r.addresses][:1]
        out.append({"id": rid, "priority": len(out) + 1, "title": r.title,
                    "rationale": rationale, "addresses": addresses, "patch": patch,
                    "code": code, "verification": None})
    return out


def _applicable(rid: str, types: set[str], a: Any) -> bool:
    has_rnn = bool(types & {"rnn", "lstm", "gru"})
    if rid in ("orthogonal_recurrent_init", "gated_recurrent_cell", "sequence_readout",
               "lstm_sequence_readout"):
        return has_rnn
    if rid in ("use_relu_he_init",):
        return bool(types & SATURATING) or bool(getattr(a, "saturating_activations", None))
    if rid == "use_leaky_relu":
        return "relu" in types or not types
    return True


def compare_verification(child_report: dict | None, child_final_loss: float | None,
                         baseline_final_loss: float | None) -> dict:
    """The measured effect of a remedy: the child job's verdict and final loss vs the parent's.

    ``improved`` is true when the child ends healthy, or when its final loss is finite and below
    the parent's (a non-finite or missing parent loss counts as infinitely bad).
    """
    def finite(x: Any) -> float | None:
        try:
            v = float(x)
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None

    verdict = (child_report or {}).get("verdict")
    c, b = finite(child_final_loss), finite(baseline_final_loss)
    lower = c is not None and (b is None or c < b)
    improved = verdict == "healthy" or (lower and verdict != "exploding")
    return {"verdict": verdict, "final_loss": c, "baseline_final_loss": b, "improved": bool(improved)}
