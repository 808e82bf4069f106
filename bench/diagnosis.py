"""Labelled benchmark of the diagnosis engine, side by side with the AUTOTRAINER rules.

Cases: the literature cases of bench/cases/ (labels measured by bench/label.py, stored in
bench/labels.json) and the 12 labelled cases of benchmark/ (labels in benchmark/labels.json).

For every case:
  1. gradwatch: the spec is trained as the service trains it (early stop on) and diagnosed;
     time to verdict = seconds from the start of training to the stop.
  2. baseline: the spec is trained to the end (no early stop; a run stops once non-finite) and
     the published AUTOTRAINER rules (Zhang et al., ICSE 2021: vanishing = first/last gradient
     norm ratio < 1e-3 and first-layer norm < 1e-4; exploding = ratio > 70 or NaN) are checked
     after every epoch; its time to verdict is the end of the epoch where a rule first fires (the
     whole run if none does). gradwatch's verdict on the full run is shown too.
  3. fix (sick cases): the priority-1 recommendation's patch is applied to the spec as submitted
     and the patched spec is trained and labelled by bench/label.py: fixed = labelled healthy.

    python bench/diagnosis.py [--only SUBSTRING ...] [--no-fix] [--json OUT] [--seed-offset N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jsonpatch  # noqa: E402

from bench import label as labeller  # noqa: E402
from models.diagnosis import analyse, autotrainer_verdict, diagnose  # noqa: E402
from models.training import train  # noqa: E402
from models.validation import Limits, check_spec  # noqa: E402


def load_cases(only: list[str] | None) -> list[tuple[str, dict, str]]:
    cases = []
    lit = json.loads((ROOT / "bench" / "labels.json").read_text())
    for p in sorted((ROOT / "bench" / "cases").glob("*.json")):
        cases.append((f"lit/{p.name}", json.loads(p.read_text()), lit[p.name]["verdict"]))
    dev = json.loads((ROOT / "benchmark" / "labels.json").read_text())
    for p in sorted((ROOT / "benchmark" / "cases").glob("*.json")):
        cases.append((f"dev/{p.name}", json.loads(p.read_text()), dev[p.name]["verdict"]))
    if only:
        cases = [c for c in cases if any(o in c[0] for o in only)]
    return [c for c in cases if c[2] in ("vanishing", "exploding", "healthy")]


def run_case(name: str, raw: dict, label: str, fix: bool) -> dict:
    spec = check_spec(raw, Limits())
    res = train(spec, device="cpu", early_stop=True)
    report = diagnose(res.records, spec=raw, final=True)
    out = {"case": name, "label": label, "verdict": report["verdict"], "confidence": report["confidence"],
           "time_s": round(res.time_to_verdict_s, 2), "stopped": res.stopped, "epochs": len(res.records),
           "p1": report["recommendations"][0]["id"] if report["recommendations"] else None}
    a = analyse(res.records, spec=raw)
    out["sens_init"], out["key_init"] = a.sens_init, a.key_init

    # full run: the baseline, and gradwatch without early stop
    state = {"dead": False}

    def on_epoch(rec: dict) -> None:
        if rec.get("nonfinite") or any((l.get("nonfinite_grads") or 0) > 0 for l in rec["layers"]):
            state["dead"] = True

    full = train(spec, device="cpu", early_stop=False, on_epoch=on_epoch, should_stop=lambda: state["dead"])
    base, base_t = "healthy", full.epoch_times[-1] if full.epoch_times else 0.0
    for k in range(1, len(full.records) + 1):
        v = autotrainer_verdict(full.records[:k])
        if v != "healthy":
            base, base_t = v, full.epoch_times[k - 1]
            break
    out["baseline"] = base
    out["baseline_time_s"] = round(base_t, 2)
    out["verdict_full_run"] = diagnose(full.records, spec=raw, final=True)["verdict"]

    if fix and label != "healthy":
        recs = report["recommendations"]
        if not recs or not recs[0].get("patch"):
            out["fixed"], out["fix_why"] = False, "no patch"
        else:
            patched = jsonpatch.apply_patch(raw, recs[0]["patch"])
            records, _ = labeller.run(patched)
            lab, why = labeller.decide(labeller.measure(records))
            out["fixed"], out["fix_why"] = lab == "healthy", f"{lab}: {why}"
    return out


def warm_up() -> None:
    """First-use costs (scikit-learn's dataset import, kernel set-up) are paid once by a worker
    process, so they are kept out of the per-case timings."""
    tiny = {"network": {"layers": [{"type": "conv2d", "out_channels": 2, "kernel_size": 3},
                                   {"type": "relu"}, {"type": "flatten"},
                                   {"type": "linear", "out_features": 10}]},
            "data": {"name": "digits", "shape": "image", "n_samples": 64},
            "training": {"epochs": 1, "batch_size": 32}}
    train(check_spec(tiny, Limits()), device="cpu")
    rnn = {"network": {"layers": [{"type": "rnn", "cell": "lstm", "hidden_size": 4}, {"type": "linear", "out_features": 1}]},
           "data": {"name": "adding", "seq_len": 5, "n_samples": 64}, "training": {"epochs": 1}}
    train(check_spec(rnn, Limits()), device="cpu")


def summarise(rows: list[dict], engine: str, time_key: str) -> dict:
    n = len(rows)
    correct = sum(r[engine] == r["label"] for r in rows)
    healthy = [r for r in rows if r["label"] == "healthy"]
    false_alarms = sum(r[engine] != "healthy" for r in healthy)
    sick = [r for r in rows if r["label"] != "healthy"]
    missed = sum(r[engine] == "healthy" for r in sick)
    times = [r[time_key] for r in rows]
    sick_times = [r[time_key] for r in sick]
    return {"cases": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "false_alarms": false_alarms, "healthy_cases": len(healthy), "missed_sick": missed,
            "sick_cases": len(sick),
            "median_time_s": statistics.median(times) if times else 0.0,
            "median_time_sick_s": statistics.median(sick_times) if sick_times else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="gradwatch diagnosis benchmark")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of case names to run")
    ap.add_argument("--no-fix", action="store_true", help="skip training the priority-1 patches")
    ap.add_argument("--json", default=None, help="write the per-case rows to this file")
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="add this to data.seed and training.seed of every case (robustness; the "
                         "literature labels hold for offsets 0 and 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = load_cases(args.only)
    warm_up()
    rows = []
    t0 = time.perf_counter()
    print(f"{'case':62s} {'label':9s} {'gradwatch':9s} {'conf':>5s} {'t(s)':>5s} {'ep':>3s} "
          f"{'AUTOTRAINER':11s} {'t(s)':>5s} {'full-run':9s} p1-fix", flush=True)
    for name, raw, label in cases:
        r = run_case(name, labeller.seeded(raw, args.seed_offset), label, not args.no_fix)
        rows.append(r)
        mark = lambda v: v + ("" if v == label else "*")
        fx = "" if label == "healthy" or args.no_fix else (
            f"{r['p1']}: {'FIXED' if r['fixed'] else 'NOT FIXED'} ({r['fix_why'][:70]})")
        print(f"{name[:62]:62s} {label:9s} {mark(r['verdict']):9s} {r['confidence']:5.2f} {r['time_s']:5.1f} "
              f"{r['epochs']:3d} {mark(r['baseline']):11s} {r['baseline_time_s']:5.1f} "
              f"{mark(r['verdict_full_run']):9s} {fx}", flush=True)
    gw = summarise(rows, "verdict", "time_s")
    at = summarise(rows, "baseline", "baseline_time_s")
    sick = [r for r in rows if r["label"] != "healthy"]
    fixed = sum(bool(r.get("fixed")) for r in sick)
    full_ok = sum(r["verdict_full_run"] == r["label"] for r in rows)
    counts = {k: sum(r["label"] == k for r in rows) for k in ("vanishing", "exploding", "healthy")}
    print()
    print(f"cases: {len(rows)} ({counts['vanishing']} vanishing, {counts['exploding']} exploding, "
          f"{counts['healthy']} healthy); wall time {time.perf_counter() - t0:.0f} s")
    print(f"{'':34s} {'gradwatch':>14s} {'AUTOTRAINER':>14s}")
    print(f"{'verdict accuracy':34s} {gw['correct']:>5d}/{gw['cases']:<3d} {gw['accuracy']:5.1%} "
          f"{at['correct']:>5d}/{at['cases']:<3d} {at['accuracy']:5.1%}")
    print(f"{'false alarms on healthy cases':34s} {gw['false_alarms']:>5d}/{gw['healthy_cases']:<8d} "
          f"{at['false_alarms']:>5d}/{at['healthy_cases']:<8d}")
    print(f"{'sick cases called healthy':34s} {gw['missed_sick']:>5d}/{gw['sick_cases']:<8d} "
          f"{at['missed_sick']:>5d}/{at['sick_cases']:<8d}")
    if not args.no_fix:
        print(f"{'priority-1 patch makes it healthy':34s} {fixed:>5d}/{len(sick):<3d} "
              f"{(fixed / len(sick) if sick else 0):5.1%} {'n/a (no patches)':>14s}")
    print(f"{'median time to verdict (all)':34s} {gw['median_time_s']:>12.2f} s {at['median_time_s']:>12.2f} s")
    print(f"{'median time to verdict (sick)':34s} {gw['median_time_sick_s']:>12.2f} s {at['median_time_sick_s']:>12.2f} s")
    print(f"{'gradwatch verdict on full runs':34s} {full_ok:>5d}/{len(rows):<3d}")
    hs = [r["sens_init"] for r in rows if r["label"] == "healthy" and r["sens_init"] is not None]
    if hs:
        print(f"loss sensitivity ||g||*||W||/loss at init: healthy cases min {min(hs):.2g}, max {max(hs):.2g} "
              f"(collapse threshold {analyse([]).th['collapse_sensitivity']:g})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "gradwatch": gw, "autotrainer": at,
                                               "fixed": fixed}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
