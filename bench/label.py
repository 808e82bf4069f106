"""Independent labeller: measures a case by the criteria of benchmark/README.md.

It trains the spec (no early stop), reads the measured statistics of every epoch (the same
Probe the service uses: gradient norms per weighted layer, at initialisation = the first step
of epoch 1, and dL/dh_t through time) and decides the label from the README's criteria alone.
It never calls ``models.diagnosis`` (no rule under test is involved).

Criteria (benchmark/README.md, "How the labels were decided"):
  exploding  non-finite loss or gradients; or an epoch's mean loss > 100x the loss at init; or
             the first/last (or temporal) ratio > 1e4 in every epoch.
  vanishing  learns little (accuracy < chance + 20% of the headroom, or MSE > 0.7x target
             variance) AND the key ratio < 1e-4 in every epoch and at init (a first layer or
             first step with exactly zero gradient counts).
             Extension (documented in docs/diagnosis.md): learns little AND every weighted
             layer's gradient norm is below 1e-4 at init and in every epoch ("every gradient
             collapses": the deep ReLU / variance-1/n case whose ratio stays near 1).
  healthy    learns (accuracy >= chance + 60% of the headroom, or MSE <= 0.5x variance with the
             final loss <= half the first epoch's) AND first/last within [1e-2, 1e2] and
             temporal within [1e-3, 1e3] in every epoch and at init.
  otherwise  ambiguous.

A case's label must hold on every run (seed offsets 0 and 1 by default, offsets added to both
data.seed and training.seed); otherwise it is ambiguous.

    python -m bench.label bench/cases/*.json [--seeds 0 1] [--out bench/labels.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WEIGHTED = {"linear", "conv2d", "rnn", "lstm", "gru"}


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return a / b


def seeded(raw: dict, offset: int) -> dict:
    spec = copy.deepcopy(raw)
    if offset:
        data = spec.setdefault("data", {})
        data["seed"] = int(data.get("seed", 0)) + offset
        tr = spec.setdefault("training", {})
        tr["seed"] = int(tr.get("seed", 0)) + offset
    return spec


def run(raw: dict) -> tuple[list[dict], float]:
    """Train without early stop; stop once the run is non-finite (it can only stay so)."""
    from models.training import train
    from models.validation import Limits, check_spec

    spec = check_spec(raw, Limits())
    state = {"dead": False}

    def on_epoch(rec: dict) -> None:
        if rec.get("nonfinite") or any((l.get("nonfinite_grads") or 0) > 0 for l in rec.get("layers") or []):
            state["dead"] = True

    t0 = time.perf_counter()
    res = train(spec, on_epoch=on_epoch, should_stop=lambda: state["dead"], device="cpu",
                early_stop=False)
    return res.records, time.perf_counter() - t0


def measure(records: list[dict]) -> dict:
    """The README's measurements of one run."""
    names = [l["name"] for l in records[0]["layers"] if l.get("type") in WEIGHTED]
    first, last = names[0], names[-1]

    def gn(rec: dict, name: str, key: str) -> float | None:
        for l in rec["layers"]:
            if l["name"] == name:
                return _f((l.get("grad_norm") or {}).get(key))
        return None

    nonfinite = any(r.get("nonfinite") or r.get("loss") is None for r in records) or any(
        (l.get("nonfinite_grads") or 0) > 0 for r in records for l in r["layers"])
    init_loss = _f((records[0].get("loss_stats") or {}).get("first"))
    losses = [_f(r.get("loss")) for r in records]
    ratios = [_div(gn(r, first, "mean"), gn(r, last, "mean")) for r in records]
    ratio_init = _div(gn(records[0], first, "first"), gn(records[0], last, "first"))
    temporal = []
    for r in records:
        t = r.get("temporal")
        steps = (t or {}).get("grad_norm_by_step") or []
        temporal.append(_div(_f(steps[0]), _f(steps[-1])) if len(steps) >= 2 else None)
    recurrent = any(v is not None for v in temporal)
    zero_first = all(gn(r, first, "max") == 0.0 for r in records)
    zero_step = recurrent and all(
        _f(((r.get("temporal") or {}).get("grad_norm_by_step") or [None])[0]) == 0.0 for r in records)
    max_grad = [max((gn(r, n, "mean") or 0.0) for n in names) for r in records]
    max_grad_init = max((gn(records[0], n, "first") or 0.0) for n in names)
    m = records[-1].get("metrics") or {}
    return {"nonfinite": nonfinite, "init_loss": init_loss, "losses": losses,
            "ratios": ratios, "ratio_init": ratio_init, "temporal": temporal,
            "recurrent": recurrent, "zero_first": zero_first or zero_step,
            "max_grad": max_grad, "max_grad_init": max_grad_init,
            "accuracy": _f(m.get("accuracy")), "chance": _f(m.get("chance_accuracy")),
            "mse": _f(m.get("mse")), "variance": _f(m.get("target_variance")),
            "epochs": len(records)}


def decide(s: dict) -> tuple[str, str]:
    """(label, the measured reason) from one run's measurements."""
    every = lambda vals, pred: bool(vals) and all(v is not None and pred(v) for v in vals)
    key = s["temporal"] if s["recurrent"] else s["ratios"]
    key_init = s["temporal"][0] if s["recurrent"] else s["ratio_init"]
    if s["nonfinite"]:
        return "exploding", "non-finite loss/gradients"
    if s["init_loss"] and any(l is not None and l > 100 * s["init_loss"] for l in s["losses"]):
        mx = max(l for l in s["losses"] if l is not None)
        return "exploding", f"epoch loss {mx:.3g} > 100x init {s['init_loss']:.3g}"
    if every(s["ratios"], lambda v: v > 1e4) or (s["recurrent"] and every(s["temporal"], lambda v: v > 1e4)):
        return "exploding", f"ratio > 1e4 every epoch (min {min(key):.2g})"
    if s["accuracy"] is not None:
        c = s["chance"] or 0.1
        little = s["accuracy"] < c + 0.2 * (1 - c)
        well = s["accuracy"] >= c + 0.6 * (1 - c)
        fit = f"acc {s['accuracy']:.3f} (chance {c:.3f})"
    else:
        frac = s["mse"] / s["variance"] if s["mse"] is not None and s["variance"] else math.inf
        little = frac > 0.7
        l0, l1 = s["losses"][0], s["losses"][-1]
        well = frac <= 0.5 and l0 is not None and l1 is not None and l1 <= 0.5 * l0
        fit = f"mse/var {frac:.3g}"
    if little:
        if every(key, lambda v: v < 1e-4) and key_init is not None and key_init < 1e-4:
            return "vanishing", f"key ratio <= {max(key):.2g} every epoch, init {key_init:.2g}; {fit}"
        if s["zero_first"]:
            return "vanishing", f"first layer/step gets exactly zero gradient; {fit}"
        if max(s["max_grad"]) < 1e-4 and s["max_grad_init"] < 1e-4:
            return "vanishing", (f"every layer's gradient < 1e-4 (max {max(s['max_grad']):.2g}, "
                                 f"init {s['max_grad_init']:.2g}); {fit}")
    if well:
        r_ok = every(s["ratios"], lambda v: 1e-2 <= v <= 1e2) and s["ratio_init"] is not None \
            and 1e-2 <= s["ratio_init"] <= 1e2
        t_ok = (not s["recurrent"]) or every(s["temporal"], lambda v: 1e-3 <= v <= 1e3)
        if r_ok and t_ok:
            lo = min(key + [key_init])
            hi = max(key + [key_init])
            return "healthy", f"key ratio in [{lo:.2g}, {hi:.2g}]; {fit}"
    return "ambiguous", (f"ratios {[None if v is None else float(f'{v:.2g}') for v in key]}, "
                         f"init {key_init if key_init is None else float(f'{key_init:.2g}')}; {fit}")


def label_spec(raw: dict, seeds: tuple[int, ...] = (0, 1)) -> dict:
    runs = []
    for off in seeds:
        records, secs = run(seeded(raw, off))
        lab, why = decide(measure(records))
        runs.append({"seed_offset": off, "label": lab, "why": why, "seconds": round(secs, 2)})
    labels = {r["label"] for r in runs}
    verdict = labels.pop() if len(labels) == 1 else "ambiguous"
    return {"verdict": verdict, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default=None, help="labels file to update (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out_path = Path(args.out) if args.out else None
    labels = json.loads(out_path.read_text()) if out_path and out_path.exists() else {}
    for path in args.cases:
        raw = json.loads(Path(path).read_text())
        res = label_spec(raw, tuple(args.seeds))
        name = Path(path).name
        print(f"{name:58s} {res['verdict']:10s} " + " | ".join(
            f"{r['label']} ({r['why']}; {r['seconds']}s)" for r in res["runs"]), flush=True)
        if out_path:
            labels[name] = res
            out_path.write_text(json.dumps(labels, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
