"""The diagnosis: epoch records -> the contract's Report (minus ``job_id``).

Pure functions over epoch records (docs/architecture.md, "Epoch record"), shared by spec jobs and
external jobs (which have no spec). The rules and where their thresholds come from are in
``docs/diagnosis.md``; the defaults live in ``models.thresholds``.

Signals used together (never one ratio alone):
  * non-finite loss / gradients;
  * loss history against the loss at initialisation (divergence, spikes, plateau, oscillation);
  * the key ratio: first/last weighted-layer gradient norm (per epoch and at initialisation) or,
    for recurrent nets, ||dL/dh_1|| / ||dL/dh_T||;
  * absolute gradient norms relative to the weight norms (loss sensitivity ||g||*||W||/loss, the
    update ratio) -- this catches a whole network whose gradients collapse together (deep ReLU
    with weight variance 1/n keeps the first/last ratio near 1);
  * growth of the gradient norms across epochs;
  * activation saturation (sigmoid/tanh) and dead ReLU fractions;
  * zero-init symmetry (zero weights, exactly-zero gradients, constant inits in the spec);
  * whether the model learns at all (accuracy vs chance, MSE vs target variance, loss progress).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from models.thresholds import resolve

VERDICTS = ("vanishing", "exploding", "healthy")

# Layer types whose gradient norms enter the first/last ratio (benchmark/README.md: linear,
# conv2d, rnn). External jobs report their own type names; we accept the usual spellings.
WEIGHTED_TYPES = {
    "linear", "conv1d", "conv2d", "conv3d", "conv", "convtranspose2d", "rnn", "lstm", "gru",
    "embedding", "bilinear",
}
RECURRENT_TYPES = {"rnn", "lstm", "gru"}
NORM_TYPES = {"batch_norm", "layer_norm", "batchnorm1d", "batchnorm2d", "layernorm", "groupnorm",
              "prelu"}


# ----------------------------------------------------------------------------------- helpers
def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    """a/b with 0/0 undefined, x/0 = inf."""
    if a is None or b is None:
        return None
    if b == 0:
        return None if a == 0 else math.inf
    return a / b


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if x == math.inf:
        return "inf"
    if x == 0:
        return "0"
    if 1e-2 <= abs(x) < 1e3:
        return f"{x:.3g}"
    return f"{x:.1e}"


def _clean(x: float | None) -> float | None:
    """JSON-safe number (inf -> a large finite stand-in is wrong; we emit None)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.4g}")


def _layer_type(layer: dict) -> str:
    return str(layer.get("type") or "").lower()


def _is_weighted(layer: dict) -> bool:
    t = _layer_type(layer)
    if t in WEIGHTED_TYPES:
        return True
    if t in NORM_TYPES:
        return False
    return any(w in t for w in ("linear", "conv", "rnn", "lstm", "gru"))


def _epoch_range(epochs: Iterable[int]) -> list[int]:
    e = sorted(set(int(x) for x in epochs))
    return [e[0], e[-1]] if e else []


# ----------------------------------------------------------------------------------- analysis
@dataclass
class Analysis:
    """Every signal the rules look at, computed once from the records."""

    th: dict[str, float]
    epochs: list[int] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    position: dict[str, int] = field(default_factory=dict)  # layer name -> index in layer_names
    layer_types: dict[str, str] = field(default_factory=dict)
    weighted: list[str] = field(default_factory=list)
    first: str | None = None
    last: str | None = None
    recurrent: bool = False
    init_loss: float | None = None
    losses: list[float | None] = field(default_factory=list)
    # non-finite
    nonfinite_epochs: list[int] = field(default_factory=list)
    nonfinite_grad_layers: dict[str, list[int]] = field(default_factory=dict)
    # loss history
    divergence_epochs: list[int] = field(default_factory=list)
    spike_epochs: list[int] = field(default_factory=list)
    max_loss_factor: float | None = None
    # ratios
    ratio_init: float | None = None
    ratios: list[float | None] = field(default_factory=list)
    temporal_ratios: list[float | None] = field(default_factory=list)
    temporal_layer: str | None = None
    temporal_wrt: str | None = None
    collapsed_in_training: bool = False  # key ratio fine at init, vanished in every later epoch
    key_name: str = "grad_norm_ratio_first_last"
    key_init: float | None = None
    key_ratios: list[float | None] = field(default_factory=list)
    # absolute scale
    sens_init: float | None = None
    sens: list[float | None] = field(default_factory=list)
    max_grad_init: float | None = None
    last_update_ratio: float | None = None  # max over weighted layers, last epoch
    grad_growth: dict[str, float] = field(default_factory=dict)
    zero_first_grad_epochs: list[int] = field(default_factory=list)
    zero_weight_layers: list[str] = field(default_factory=list)
    # activations
    saturated: dict[str, list] = field(default_factory=dict)  # name -> [max frac, epochs, module]
    dead: dict[str, list] = field(default_factory=dict)
    # learning
    accuracy: float | None = None
    chance: float | None = None
    mse_frac: float | None = None
    loss_frac: float | None = None  # best epoch loss / loss at init
    learned_little: bool | None = None
    learned_well: bool | None = None
    plateau_epochs: list[int] = field(default_factory=list)
    oscillating: bool = False
    progress_stalled: bool = False
    # spec-derived facts (may be empty)
    spec_constant_init: list[str] = field(default_factory=list)
    saturating_activations: list[str] = field(default_factory=list)  # sigmoid/tanh modules seen
    init_loss_over_chance: float | None = None  # loss at init / its no-information level
    init_loss_limit: float = 5.0
    # decisions
    small_layers: list[str] = field(default_factory=list)
    exploding_reasons: list[str] = field(default_factory=list)
    vanishing_reasons: list[str] = field(default_factory=list)
    verdict: str = "healthy"


def _spec_chance(spec: dict | None) -> float | None:
    data = _get(spec, "data") or {}
    name = data.get("name") if isinstance(data, dict) else None
    classes = None
    if name == "digits":
        classes = 10
    elif name in ("spirals", "blobs") and isinstance(data.get("classes"), int):
        classes = data["classes"]
    elif name == "spirals":
        classes = 2
    return 1.0 / classes if classes else None


def _spec_constant_inits(spec: dict | None) -> list[str]:
    """JSON pointers of weighted layers whose weights start all equal (zeros/ones/constant)."""
    out: list[str] = []

    def walk(layers: Any, base: str) -> None:
        if not isinstance(layers, list):
            return
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                continue
            p = f"{base}/{i}"
            t = layer.get("type")
            if t in ("repeat", "residual"):
                walk(layer.get("layers"), p + "/layers")
                continue
            for key in ("init", "recurrent_init"):
                init = layer.get(key)
                name = init.get("name") if isinstance(init, dict) else init
                if name in ("zeros", "ones", "constant"):
                    out.append(p)
                    break

    walk(_get(spec, "network", "layers"), "/network/layers")
    return out


def analyse(records: list[dict], *, spec: dict | None = None,
            thresholds: dict | None = None) -> Analysis:
    if thresholds is None:
        thresholds = _get(spec, "analysis", "thresholds") if spec else None
    a = Analysis(th=resolve(thresholds))
    th = a.th
    records = [r for r in (records or []) if isinstance(r, dict)]
    if not records:
        return a
    a.epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(records)]

    # layers ----------------------------------------------------------------------------------
    for r in records:
        for layer in r.get("layers") or []:
            n = layer.get("name")
            if n is not None and n not in a.layer_types:
                a.position[n] = len(a.layer_names)
                a.layer_names.append(n)
                a.layer_types[n] = _layer_type(layer)
    weighted = [n for n in a.layer_names if _is_weighted({"type": a.layer_types[n]})]
    a.weighted = weighted if len(weighted) >= 1 else list(a.layer_names)
    if a.weighted:
        a.first, a.last = a.weighted[0], a.weighted[-1]
    a.recurrent = any(a.layer_types[n] in RECURRENT_TYPES for n in a.layer_names) or any(
        isinstance(r.get("temporal"), dict) for r in records)

    index = {id(r): {layer.get("name"): layer for layer in r.get("layers") or []} for r in records}

    def layer_of(r: dict, name: str | None) -> dict | None:
        return None if name is None else index[id(r)].get(name)

    # loss ------------------------------------------------------------------------------------
    r0 = records[0]
    a.init_loss = _num(_get(r0, "loss_stats", "first"))
    if a.init_loss is None:
        a.init_loss = _num(r0.get("loss"))
    for r in records:
        loss = _num(r.get("loss"))
        a.losses.append(loss)
        if bool(r.get("nonfinite")) or (r.get("loss") is None and r.get("steps", 1) != 0):
            a.nonfinite_epochs.append(int(r.get("epoch", 0)))
        for layer in r.get("layers") or []:
            if (layer.get("nonfinite_grads") or 0) > 0:
                a.nonfinite_grad_layers.setdefault(layer["name"], []).append(int(r["epoch"]))
    if a.init_loss is not None and a.init_loss > 0:
        worst = None
        for r, loss in zip(records, a.losses):
            e = int(r.get("epoch", 0))
            if loss is not None and loss > th["loss_divergence_factor"] * a.init_loss:
                a.divergence_epochs.append(e)
            mx = _num(_get(r, "loss_stats", "max"))
            if mx is not None and mx > th["loss_spike_factor"] * a.init_loss:
                a.spike_epochs.append(e)
            for v in (loss, mx):
                if v is not None:
                    f = v / a.init_loss
                    worst = f if worst is None else max(worst, f)
        a.max_loss_factor = worst

    # ratios ----------------------------------------------------------------------------------
    for r in records:
        lf, ll = layer_of(r, a.first), layer_of(r, a.last)
        a.ratios.append(_ratio(_num(_get(lf, "grad_norm", "mean")), _num(_get(ll, "grad_norm", "mean")))
                        if a.first != a.last else None)
        t = r.get("temporal")
        tr = None
        if isinstance(t, dict):
            steps = t.get("grad_norm_by_step") or []
            if len(steps) >= 2:
                tr = _ratio(_num(steps[0]), _num(steps[-1]))
            a.temporal_layer = a.temporal_layer or t.get("layer")
            a.temporal_wrt = a.temporal_wrt or t.get("wrt")
        a.temporal_ratios.append(tr)
    lf0, ll0 = layer_of(r0, a.first), layer_of(r0, a.last)
    if a.first != a.last:
        a.ratio_init = _ratio(_num(_get(lf0, "grad_norm", "first")), _num(_get(ll0, "grad_norm", "first")))
    if a.recurrent and any(t is not None for t in a.temporal_ratios):
        a.key_name = "temporal_ratio_first_last_step"
        a.key_ratios = list(a.temporal_ratios)
        a.key_init = a.temporal_ratios[0]  # measured on one batch of epoch 1
    else:
        a.key_ratios = list(a.ratios)
        a.key_init = a.ratio_init

    # absolute scale: loss sensitivity ||g||*||W|| / loss, growth, zero grads ------------------
    def sensitivity(r: dict, which: str, loss: float | None) -> float | None:
        if loss is None or loss <= 0:
            return None
        best = None
        for n in a.weighted:
            layer = layer_of(r, n)
            g = _num(_get(layer, "grad_norm", which))
            w = _num(_get(layer, "weight_norm"))
            if g is None or w is None:
                continue
            s = g * w / loss
            best = s if best is None else max(best, s)
        return best

    a.sens_init = sensitivity(r0, "first", a.init_loss)
    if a.sens_init is None:  # records without grad_norm.first (minimal external records)
        a.sens_init = sensitivity(r0, "mean", _num(r0.get("loss")))
    a.sens = [sensitivity(r, "mean", loss) for r, loss in zip(records, a.losses)]
    ups = [_num(_get(layer_of(records[-1], n), "update_ratio")) for n in a.weighted]
    ups = [u for u in ups if u is not None]
    a.last_update_ratio = max(ups) if ups else None
    grads0 = [_num(_get(layer_of(r0, n), "grad_norm", "first")) for n in a.weighted]
    grads0 = [g for g in grads0 if g is not None]
    a.max_grad_init = max(grads0) if grads0 else None
    for n in a.weighted:
        g0 = _num(_get(layer_of(r0, n), "grad_norm", "first"))
        if not g0:
            continue
        top = max((_num(_get(layer_of(r, n), "grad_norm", "mean")) or 0.0) for r in records)
        if top / g0 > 1:
            a.grad_growth[n] = top / g0
    for r in records:
        g = _get(layer_of(r, a.first), "grad_norm")
        if isinstance(g, dict) and _num(g.get("max")) == 0.0:
            a.zero_first_grad_epochs.append(int(r["epoch"]))
    for n in a.weighted:
        w = _num(_get(layer_of(r0, n), "weight_norm"))
        if w == 0.0:
            a.zero_weight_layers.append(n)
    a.spec_constant_init = _spec_constant_inits(spec)

    # activations -----------------------------------------------------------------------------
    seen_modules: set[str] = set()
    for r in records:
        for layer in r.get("layers") or []:
            act = layer.get("activation")
            if not isinstance(act, dict):
                continue
            name, e = layer.get("name"), int(r.get("epoch", 0))
            module = str(act.get("module") or "")
            if module.rsplit(".", 1)[-1] in ("sigmoid", "tanh") and module not in seen_modules:
                seen_modules.add(module)
                a.saturating_activations.append(module)
            sat, dead = _num(act.get("saturated_frac")), _num(act.get("dead_frac"))
            for store, frac, limit in ((a.saturated, sat, th["saturation_frac"]),
                                       (a.dead, dead, th["dead_relu_frac"])):
                if frac is not None and frac > limit:
                    entry = store.setdefault(name, [0.0, [], act.get("module")])
                    entry[0] = max(entry[0], frac)
                    entry[1].append(e)

    # learning --------------------------------------------------------------------------------
    last_metrics = {}
    for r in reversed(records):
        if isinstance(r.get("metrics"), dict) and r["metrics"]:
            last_metrics = r["metrics"]
            break
    acc = _num(last_metrics.get("accuracy"))
    mse, var = _num(last_metrics.get("mse")), _num(last_metrics.get("target_variance"))
    finite_losses = [x for x in a.losses if x is not None]
    m0 = records[0].get("metrics") if isinstance(records[0].get("metrics"), dict) else {}
    if a.init_loss is not None:
        c0 = _num(m0.get("chance_accuracy")) or _spec_chance(spec)
        v0 = _num(m0.get("target_variance"))
        if c0 and 0 < c0 < 1:
            a.init_loss_over_chance = a.init_loss / math.log(1.0 / c0)
        elif v0:
            # MSE of a constant output is var + mean^2; the mean is not reported, so allow more
            a.init_loss_over_chance = a.init_loss / v0
            a.init_loss_limit = 50.0
    if a.init_loss and finite_losses:
        a.loss_frac = min(finite_losses) / a.init_loss
    if acc is not None:
        chance = _num(last_metrics.get("chance_accuracy")) or _spec_chance(spec)
        if chance is None and a.init_loss and 0.6 < a.init_loss < 7:
            chance = 1.0 / max(2, round(math.exp(a.init_loss)))  # CE at init ~ ln(classes)
        chance = chance if chance is not None else 0.5
        a.accuracy, a.chance = acc, chance
        a.learned_little = acc < chance + th["learned_little_accuracy_frac"] * (1 - chance)
        a.learned_well = acc >= chance + 0.6 * (1 - chance)
    elif mse is not None and var:
        a.mse_frac = mse / var
        a.learned_little = a.mse_frac > th["learned_little_mse_frac"]
        last_loss = finite_losses[-1] if finite_losses else None
        first_loss = a.losses[0]
        a.learned_well = a.mse_frac <= 0.5 and (
            last_loss is None or first_loss is None or last_loss <= 0.5 * first_loss)
    elif a.loss_frac is not None:
        a.learned_little = a.loss_frac > th["learned_little_loss_frac"]
        a.learned_well = a.loss_frac < 0.5
    if a.nonfinite_epochs and a.learned_little is None:
        a.learned_little = True

    # plateau / oscillation / stalled progress ------------------------------------------------
    k = int(th["plateau_min_epochs"])
    if len(finite_losses) >= k and len(finite_losses) == len(a.losses):
        tail = a.losses[-k:]
        lo, hi = min(tail), max(tail)
        if hi > 0 and (hi - lo) / hi < th["plateau_rel_change"]:
            a.plateau_epochs = a.epochs[-k:]
    if len(finite_losses) >= 4:
        ups = sum(1 for x, y in zip(finite_losses, finite_losses[1:]) if y > x * 1.05)
        a.oscillating = ups >= max(2, (len(finite_losses) - 1) // 2)
    if len(a.losses) >= 2 and a.losses[-1] is not None and a.losses[-2] is not None:
        a.progress_stalled = a.losses[-1] >= (1 - th["certain_progress_rel"]) * a.losses[-2]
    elif len(a.losses) == 1 and a.losses[0] is not None and a.init_loss:
        a.progress_stalled = a.losses[0] >= (1 - th["certain_progress_rel"]) * a.init_loss

    _decide(a)
    return a


def _all_below(values: list[float | None], thr: float) -> bool:
    vals = [v for v in values]
    return bool(vals) and all(v is not None and v < thr for v in vals)


def _all_above(values: list[float | None], thr: float) -> bool:
    vals = [v for v in values]
    return bool(vals) and all(v is not None and v > thr for v in vals)


def _decide(a: Analysis) -> None:
    th = a.th
    vr = th["temporal_vanishing_ratio"] if a.key_name.startswith("temporal") else th["vanishing_ratio"]
    er = th["temporal_exploding_ratio"] if a.key_name.startswith("temporal") else th["exploding_ratio"]
    ex: list[str] = []
    if a.nonfinite_epochs or a.nonfinite_grad_layers:
        ex.append("nonfinite")
    if a.divergence_epochs or a.spike_epochs:
        ex.append("loss_divergence")
    if _all_above(a.key_ratios, er) or (a.key_name.startswith("temporal")
                                        and _all_above(a.ratios, th["exploding_ratio"])):
        ex.append("ratio")  # benchmark/README.md: the first/last OR the temporal ratio
    not_improving = a.loss_frac is None or a.loss_frac >= 1.0
    if a.grad_growth and max(a.grad_growth.values()) > th["grad_growth_factor"] and not_improving:
        ex.append("grad_growth")
    a.exploding_reasons = ex

    va: list[str] = []
    if not ex and a.learned_little:
        init_ok = a.key_init is None or a.key_init < vr
        if _all_below(a.key_ratios, vr) and init_ok:
            va.append("ratio")
        elif len(a.key_ratios) >= 3 and _all_below(a.key_ratios[1:], vr):
            # Normal at initialisation, then collapsed by training and stayed collapsed in every
            # later epoch while the model learned little: vanishing all the same (a user sees a
            # net that cannot learn because no gradient reaches its early layers/steps).
            va.append("ratio")
            a.collapsed_in_training = True
        if a.zero_first_grad_epochs and len(a.zero_first_grad_epochs) == len(a.epochs):
            va.append("zero_first_grad")
        if (a.sens_init is not None and a.sens_init < th["collapse_sensitivity"]
                and _all_below(a.sens, th["collapse_sensitivity"])):
            va.append("collapse")
    a.vanishing_reasons = va
    a.verdict = "exploding" if ex else ("vanishing" if va else "healthy")


# ----------------------------------------------------------------------------------- certainty
def verdict_is_certain(records: list[dict], thresholds: dict | None = None) -> bool:
    """True once the verdict cannot change any more (analysis.early_stop).

    Non-finite loss/gradients and a loss above ``loss_divergence_factor`` x the loss at
    initialisation are certain at once. A vanishing pattern (at initialisation and in every
    epoch so far) or a ratio explosion is certain once it has held ``certain_min_epochs`` epochs
    with no loss progress. A healthy verdict is never certain before the run ends.
    """
    if not records:
        return False
    a = analyse(records, thresholds=thresholds)
    if "nonfinite" in a.exploding_reasons or "loss_divergence" in a.exploding_reasons:
        return True
    enough = len(records) >= int(a.th["certain_min_epochs"])
    if not enough:
        return False
    if "ratio" in a.exploding_reasons:
        return True
    if a.verdict == "vanishing" and a.progress_stalled:
        if a.collapsed_in_training:
            return False  # normal at init: a later recovery is not ruled out, so train to the end
        if a.vanishing_reasons == ["collapse"]:
            # the ratio looks normal, so nothing in the labelled criteria rules out a later
            # escape: only stop once the weights are not moving either
            return a.last_update_ratio is not None and a.last_update_ratio < a.th["certain_update_ratio"]
        return True
    return False


# ----------------------------------------------------------------------------------- report
def _findings(a: Analysis) -> list[dict]:
    th = a.th
    out: list[dict] = []
    key_vals = [v for v in a.key_ratios if v is not None]

    if a.nonfinite_epochs or a.nonfinite_grad_layers:
        eps = a.nonfinite_epochs or sorted({e for v in a.nonfinite_grad_layers.values() for e in v})
        out.append({
            "kind": "nonfinite_loss", "severity": "high",
            "layers": sorted(a.nonfinite_grad_layers, key=a.position.__getitem__),
            "epochs": _epoch_range(eps),
            "evidence": {"first_nonfinite_epoch": min(eps), "loss_at_init": _clean(a.init_loss),
                         "layers_with_nonfinite_grads": len(a.nonfinite_grad_layers)},
            "message": (f"The loss or the gradients became NaN/Inf in epoch {min(eps)}: "
                        "the run diverged."),
        })
    if a.divergence_epochs or a.spike_epochs:
        eps = sorted(set(a.divergence_epochs + a.spike_epochs))
        out.append({
            "kind": "loss_divergence", "severity": "high", "layers": [],
            "epochs": _epoch_range(eps),
            "evidence": {"loss_at_init": _clean(a.init_loss),
                         "max_loss_over_init": _clean(a.max_loss_factor),
                         "threshold_factor": th["loss_divergence_factor"]},
            "message": (f"The training loss rose to {_fmt(a.max_loss_factor)}x its value at "
                        f"initialisation (limit {th['loss_divergence_factor']:g}x): the steps "
                        "overshoot."),
        })
    if a.verdict == "exploding" and ("ratio" in a.exploding_reasons or "grad_growth" in a.exploding_reasons
                                     or a.nonfinite_grad_layers or (a.max_grad_init or 0) > 0):
        layers = _exploding_layers(a)
        ev: dict[str, Any] = {a.key_name: _clean(key_vals[-1]) if key_vals else None,
                              f"{a.key_name}_at_init": _clean(a.key_init),
                              "max_grad_norm_at_init": _clean(a.max_grad_init)}
        if a.grad_growth:
            ev["max_grad_growth_over_init"] = _clean(max(a.grad_growth.values()))
        if a.nonfinite_grad_layers:
            ev["layers_with_nonfinite_grads"] = len(a.nonfinite_grad_layers)
        if "ratio" in a.exploding_reasons:
            where = ("back through time" if a.key_name.startswith("temporal")
                     else "from the last layer to the first")
            msg = (f"Gradients grow {where}: the key ratio is {_fmt(min(key_vals))} or more in "
                   f"every epoch (limit {_fmt(th['exploding_ratio'])}).")
        elif a.nonfinite_grad_layers:
            msg = "Gradients became non-finite; the gradient norms blew up before the loss did."
        else:
            msg = (f"The run diverged; gradient norms reached {_fmt(max(a.grad_growth.values()) if a.grad_growth else None)}"
                   "x their values at initialisation.")
        out.append({"kind": "exploding_gradients", "severity": "high", "layers": layers,
                    "epochs": _epoch_range(a.epochs), "evidence": ev, "message": msg})
    if a.verdict == "vanishing":
        layers = _vanishing_layers(a)
        ev = {a.key_name: _clean(max(key_vals)) if key_vals else None,
              f"{a.key_name}_at_init": _clean(a.key_init)}
        if "collapse" in a.vanishing_reasons:
            ev["max_loss_sensitivity"] = _clean(max(v for v in a.sens + [a.sens_init] if v is not None))
            ev["max_grad_norm_at_init"] = _clean(a.max_grad_init)
        if a.accuracy is not None:
            ev["accuracy"], ev["chance"] = _clean(a.accuracy), _clean(a.chance)
        if a.mse_frac is not None:
            ev["mse_over_target_variance"] = _clean(a.mse_frac)
        if "ratio" in a.vanishing_reasons and a.collapsed_in_training:
            later = [v for v in a.key_ratios[1:] if v is not None]
            what = ("||dL/dh_1|| / ||dL/dh_T||" if a.key_name.startswith("temporal")
                    else "the first layer's gradient over the last layer's")
            limit = th["temporal_vanishing_ratio"] if a.key_name.startswith("temporal") else th["vanishing_ratio"]
            msg = (f"The gradient collapsed during training: {what} was {_fmt(a.key_init)} at "
                   f"initialisation, then at most {_fmt(max(later))} in every epoch from epoch 2 on "
                   f"(limit {_fmt(limit)}), and the model learns little.")
        elif "ratio" in a.vanishing_reasons and a.key_name.startswith("temporal"):
            msg = (f"The gradient through time vanishes: ||dL/dh_1|| / ||dL/dh_T|| is at most "
                   f"{_fmt(max(key_vals))} in every epoch (limit {_fmt(th['temporal_vanishing_ratio'])}), "
                   "so early inputs cannot influence learning, and the model learns little.")
        elif "ratio" in a.vanishing_reasons and max(key_vals) > 0:
            msg = (f"The first layer's gradient is at most {_fmt(max(key_vals))} of the last "
                   f"layer's in every epoch and at initialisation (limit {_fmt(th['vanishing_ratio'])}), "
                   "and the model learns little.")
        elif "zero_first_grad" in a.vanishing_reasons or "ratio" in a.vanishing_reasons:
            msg = "The first layer gets exactly zero gradient in every epoch and the model learns little."
        else:
            msg = ("Every layer's gradient is tiny relative to its weights (loss sensitivity "
                   f"||g||*||W||/loss at most {_fmt(ev.get('max_loss_sensitivity'))}, limit "
                   f"{_fmt(th['collapse_sensitivity'])}) at initialisation and in every epoch, "
                   "although the first/last ratio looks normal: the whole network's signal has "
                   "collapsed and it learns little.")
        out.append({"kind": "vanishing_gradients", "severity": "high", "layers": layers,
                    "epochs": _epoch_range(a.epochs), "evidence": ev, "message": msg})
    if a.saturated:
        frac = max(v[0] for v in a.saturated.values())
        eps = sorted({e for v in a.saturated.values() for e in v[1]})
        every = any(len(v[1]) == len(a.epochs) for v in a.saturated.values())
        sev = "high" if a.verdict == "vanishing" else ("medium" if every else "low")
        names = sorted(a.saturated, key=a.position.__getitem__)
        modules = [a.saturated[n][2] for n in names]
        out.append({
            "kind": "saturated_activations", "severity": sev, "layers": names,
            "epochs": _epoch_range(eps),
            "evidence": {"max_saturated_frac": _clean(frac), "activation_modules": modules,
                         "threshold": th["saturation_frac"]},
            "message": (f"Up to {_clean(frac * 100)}% of the outputs of {len(names)} sigmoid/tanh "
                        f"layer(s) ({modules[0]}{', ...' if len(names) > 1 else ''}) sit within 0.01 "
                        "of the asymptotes, where the derivative is ~0."),
        })
    if a.dead:
        frac = max(v[0] for v in a.dead.values())
        eps = sorted({e for v in a.dead.values() for e in v[1]})
        every = any(len(v[1]) == len(a.epochs) for v in a.dead.values())
        sev = "high" if frac >= 0.95 else ("medium" if every else "low")
        names = sorted(a.dead, key=a.position.__getitem__)
        out.append({
            "kind": "dead_relu", "severity": sev, "layers": names,
            "epochs": _epoch_range(eps),
            "evidence": {"max_dead_frac": _clean(frac),
                         "dead_frac": {n: _clean(a.dead[n][0]) for n in names},
                         "threshold": th["dead_relu_frac"]},
            "message": (f"Up to {_clean(frac * 100)}% of the units after {len(names)} layer(s) "
                        f"({names[0]}{', ...' if len(names) > 1 else ''}) output <= 0 for every "
                        "sample of a batch: they pass no gradient."),
        })
    sym_layers = list(a.zero_weight_layers)
    if a.spec_constant_init or sym_layers:
        out.append({
            "kind": "symmetric_weights", "severity": "high" if a.verdict != "healthy" else "medium",
            "layers": sym_layers,
            "epochs": _epoch_range(a.epochs),
            "evidence": {"constant_init_pointers": a.spec_constant_init,
                         "zero_weight_layers": len(sym_layers),
                         "zero_first_layer_grad_epochs": len(a.zero_first_grad_epochs)},
            "message": ("Weights start all equal (zero or constant init): the units of a layer "
                        "get identical gradients and stay identical, and with zero weights no "
                        "gradient reaches the earlier layers."),
        })
    if a.plateau_epochs and a.learned_little and a.verdict != "exploding":
        out.append({
            "kind": "loss_plateau", "severity": "medium" if a.verdict == "vanishing" else "low",
            "layers": [], "epochs": _epoch_range(a.plateau_epochs),
            "evidence": {"loss": _clean(a.losses[-1]), "loss_at_init": _clean(a.init_loss),
                         "rel_change": th["plateau_rel_change"]},
            "message": (f"The loss has stayed within {th['plateau_rel_change'] * 100:g}% over the "
                        f"last {len(a.plateau_epochs)} epochs without the model learning."),
        })
    if a.oscillating and a.verdict != "vanishing":
        out.append({
            "kind": "loss_oscillation", "severity": "low", "layers": [],
            "epochs": _epoch_range(a.epochs),
            "evidence": {"losses": [_clean(x) for x in a.losses]},
            "message": "The epoch loss goes up as often as it goes down: the step size is large for this problem.",
        })
    return out


def _vanishing_layers(a: Analysis) -> list[str]:
    if "ratio" in a.vanishing_reasons and a.key_name.startswith("temporal"):
        return [a.temporal_layer] if a.temporal_layer else [n for n in a.weighted if a.layer_types[n] in RECURRENT_TYPES][:1]
    if "collapse" in a.vanishing_reasons and "ratio" not in a.vanishing_reasons:
        return list(a.weighted)
    return list(a.small_layers) if a.small_layers else ([a.first] if a.first else [])


def _exploding_layers(a: Analysis) -> list[str]:
    if "ratio" in a.exploding_reasons and a.key_name.startswith("temporal"):
        return [a.temporal_layer] if a.temporal_layer else []
    names = [n for n in a.weighted if n in a.nonfinite_grad_layers]
    names += [n for n, g in a.grad_growth.items() if g > 100 and n not in names]
    return sorted(names, key=a.position.__getitem__) if names else list(a.weighted)


def _layer_verdicts(a: Analysis, records: list[dict]) -> list[dict]:
    verdict = {n: "healthy" for n in a.layer_names}
    if a.verdict == "vanishing":
        for n in _vanishing_layers(a):
            if n in verdict:
                verdict[n] = "vanishing"
    elif a.verdict == "exploding":
        for n in _exploding_layers(a):
            if n in verdict:
                verdict[n] = "exploding"
    return [{"name": n, "verdict": verdict[n]} for n in a.layer_names]


def _mark_small_layers(a: Analysis, records: list[dict]) -> None:
    """Layers whose gradient is below the vanishing ratio of the last layer's (median epoch)."""
    if a.last is None:
        return
    small: list[str] = []
    index = [{layer.get("name"): layer for layer in r.get("layers") or []} for r in records]
    for n in a.weighted:
        if n == a.last:
            continue
        rs = []
        for layers in index:
            g = _num(_get(layers.get(n), "grad_norm", "mean"))
            gl = _num(_get(layers.get(a.last), "grad_norm", "mean"))
            v = _ratio(g, gl)
            if v is not None:
                rs.append(v)
        if rs and sorted(rs)[len(rs) // 2] < a.th["vanishing_ratio"]:
            small.append(n)
    a.small_layers = small or ([a.first] if a.first else [])


def _confidence(a: Analysis, final: bool) -> float:
    def margin(values: list[float | None], thr: float, below: bool) -> float:
        vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
        if not vals:
            return 1.0
        worst = max(vals) if below else min(vals)
        return abs(math.log10(thr / worst)) if (worst < thr) == below else 0.0

    if a.verdict == "exploding":
        if "nonfinite" in a.exploding_reasons:
            c = 0.99
        elif "loss_divergence" in a.exploding_reasons:
            c = 0.9 + 0.02 * min(4.0, math.log10(max(1.0, (a.max_loss_factor or 1) / a.th["loss_divergence_factor"])) + 1)
        else:
            c = 0.75 + 0.05 * min(4.0, margin(a.key_ratios, a.th["exploding_ratio"], False))
    elif a.verdict == "vanishing":
        if "ratio" in a.vanishing_reasons:
            c = 0.75 + 0.05 * min(4.0, margin(a.key_ratios + [a.key_init], a.th["vanishing_ratio"], True))
        else:
            c = 0.75
        c += 0.03 * min(3, len(a.vanishing_reasons) - 1)
    else:
        key_vals = [v for v in a.key_ratios + [a.key_init] if v is not None]
        in_band = all(1e-3 <= v <= 1e3 for v in key_vals)
        c = 0.6 + (0.2 if in_band else 0.0) + (0.15 if a.learned_well else 0.0)
    if not final:
        c *= 0.9
    return round(min(0.99, max(0.5, c)), 3)


def _summary(a: Analysis, findings: list[dict]) -> str:
    if not a.epochs:
        return "No epoch records yet: nothing to diagnose."
    top = findings[0]["message"] if findings else ""
    if a.verdict == "exploding":
        head = "Exploding: "
        if "nonfinite" in a.exploding_reasons:
            head += f"the run diverged to NaN/Inf in epoch {min(a.nonfinite_epochs or sorted({e for v in a.nonfinite_grad_layers.values() for e in v}))}."
        elif "loss_divergence" in a.exploding_reasons:
            head += f"the loss rose to {_fmt(a.max_loss_factor)}x its value at initialisation."
        else:
            head += "gradients grow by orders of magnitude " + (
                "back through time." if a.key_name.startswith("temporal") else "towards the input.")
        return head + (" " + _cause_sentence(a) if _cause_sentence(a) else "")
    if a.verdict == "vanishing":
        return "Vanishing: " + top[0].lower() + top[1:] if top else "Vanishing gradients."
    extra = [f["kind"].replace("_", " ") for f in findings]
    if extra:
        return ("Healthy: gradients reach every layer and the loss falls; minor findings: "
                + ", ".join(sorted(set(extra))) + ".")
    return "Healthy: gradients reach every layer within normal ratios and the loss falls."


def _cause_sentence(a: Analysis) -> str:
    c = cause(a)
    return {
        "learning_rate": "Gradients were normal at initialisation, so the step size (learning rate) is the cause.",
        "init_scale": "Gradient norms were already large at initialisation: the weight init is too wide.",
        "recurrent": "The recurrent weights amplify the hidden state at every step.",
    }.get(c, "")


def cause(a: Analysis) -> str:
    """The most likely cause, used to order remedies (models.remedies).

    One of: learning_rate, init_scale, recurrent (exploding); saturation, init_scale_small,
    dead_relu, symmetry, recurrent_vanishing (vanishing); none.
    """
    if a.verdict == "exploding":
        # a gradient that already grows back through time at init: the recurrent weights
        # amplify (spectral radius > 1, Pascanu et al. 2013)
        if a.key_name.startswith("temporal") and (
                "ratio" in a.exploding_reasons or (a.key_init is not None and a.key_init > 10.0)):
            return "recurrent"
        # the init is too wide when the output is already blown up before any update (loss at
        # init far above its chance level) or gradients grow towards the input at init
        if (a.init_loss_over_chance is not None and a.init_loss_over_chance > a.init_loss_limit) or (
                a.ratio_init is not None and a.ratio_init > 1e2):
            return "init_scale"
        return "learning_rate"
    if a.verdict == "vanishing":
        if a.spec_constant_init or a.zero_weight_layers:
            return "symmetry"
        if a.key_name.startswith("temporal") and "ratio" in a.vanishing_reasons:
            return "recurrent_vanishing"
        if a.dead and "zero_first_grad" in a.vanishing_reasons and max(f for f, _, _ in a.dead.values()) >= 0.9:
            return "dead_relu"
        if a.saturated or a.saturating_activations:
            return "saturation"
        return "init_scale_small"
    return "none"


def diagnose(records: list[dict], *, spec: dict | None = None, final: bool,
             thresholds: dict | None = None) -> dict:
    """The contract's Report (without ``job_id``) for these epoch records."""
    from models.remedies import recommend  # local: remedies imports this module

    records = [r for r in (records or []) if isinstance(r, dict)]
    a = analyse(records, spec=spec, thresholds=thresholds)
    _mark_small_layers(a, records)
    findings = _findings(a)
    sev_rank = {"high": 0, "medium": 1, "low": 2}
    lead = {"exploding": ("nonfinite_loss", "loss_divergence", "exploding_gradients"),
            "vanishing": ("vanishing_gradients",), "healthy": ()}[a.verdict]
    findings.sort(key=lambda f: (0 if f["kind"] in lead else 1, sev_rank[f["severity"]]))
    report = {
        "final": bool(final),
        "verdict": a.verdict,
        "confidence": _confidence(a, final) if records else 0.0,
        "summary": _summary(a, findings),
        "findings": findings,
        "layers": _layer_verdicts(a, records),
        "recommendations": recommend(a, findings, spec=spec) if records else [],
    }
    return report


def autotrainer_verdict(records: list[dict]) -> str:
    """The published AUTOTRAINER rules (Zhang et al., ICSE 2021), the benchmark's baseline.

    vanishing: first/last gradient-norm ratio < 1e-3 and first-layer norm < 1e-4 (any epoch);
    exploding: ratio > 70 or a NaN (any epoch).
    """
    a = analyse(records)
    if a.nonfinite_epochs or a.nonfinite_grad_layers:
        return "exploding"
    for r, ratio in zip(records, a.ratios):
        if ratio is not None and ratio > 70:
            return "exploding"
    for r, ratio in zip(records, a.ratios):
        g1 = None
        for layer in r.get("layers") or []:
            if layer.get("name") == a.first:
                g1 = _num(_get(layer, "grad_norm", "mean"))
        if ratio is not None and ratio < 1e-3 and g1 is not None and g1 < 1e-4:
            return "vanishing"
    return "healthy"
