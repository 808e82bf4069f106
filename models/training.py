"""Training a spec job while the Probe records per-epoch statistics.

```python
result = train(spec, on_epoch=lambda record: ..., should_stop=lambda: False,
               device="auto", threads=None, early_stop=None)
result.records            # epoch records (docs/architecture.md, "Epoch record")
result.stopped            # "completed" | "early_stop" | "cancelled"
result.time_to_verdict_s  # seconds from the call to the moment the verdict was known
result.final_loss         # the last epoch's mean loss (None if it was not finite)
```

A diverging run (NaN/Inf) is data, never an exception: the records say so. ``should_stop`` is
called at every step, so a cancel takes effect within one step. With early stop the run ends as
soon as ``models.diagnosis.verdict_is_certain`` says the verdict cannot change any more; a
non-finite loss is checked at every step on the CPU (every ``_NONFINITE_CHECK_EVERY`` steps on
an accelerator, where a check is a host sync) and ends the run at once.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from gradwatch.probe import Probe
from models.builder import build_model
from models.datasets import make_dataset
from models.diagnosis import verdict_is_certain

_NONFINITE_CHECK_EVERY = 16   # steps, on accelerators (a check costs a host sync there)
_EVAL_CHUNK = 4096            # samples per forward pass when measuring the epoch's metrics

Stopped = Literal["completed", "early_stop", "cancelled"]


@dataclass
class TrainResult:
    records: list[dict] = field(default_factory=list)
    stopped: Stopped = "completed"
    time_to_verdict_s: float = 0.0
    final_loss: float | None = None
    #: seconds since the call at the end of each epoch (bench / diagnostics)
    epoch_times: list[float] = field(default_factory=list)


def _attr(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def resolve_device(requested: str | None, spec_device: str | None = None) -> torch.device:
    want = requested if requested not in (None, "auto") else (spec_device or "auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        want = "cpu"
    return torch.device(want)


def make_optimizer(params: Any, optimizer: Any, lr: float) -> torch.optim.Optimizer:
    """``optimizer``: a name (sgd, adam, adamw, rmsprop) or an object {name, momentum,
    weight_decay, betas}."""
    if isinstance(optimizer, str):
        name, opts = optimizer, {}
    else:
        name = _attr(optimizer, "name", "sgd")
        opts = {k: _attr(optimizer, k) for k in ("momentum", "weight_decay", "betas")}
    name = str(name).lower()
    momentum = opts.get("momentum")
    wd = opts.get("weight_decay") or 0.0
    betas = opts.get("betas")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum or 0.0, weight_decay=wd)
    if name == "adam":
        kw = {"betas": tuple(betas)} if betas else {}
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **kw)
    if name == "adamw":
        kw = {"betas": tuple(betas)} if betas else {}
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd if "weight_decay" in opts and opts["weight_decay"] is not None else 0.01, **kw)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum or 0.0, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}")


def make_loss(name: str, task: str, n_outputs: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``auto`` = cross-entropy for classification, MSE for regression. Regression-style losses on
    a classification task compare against one-hot targets."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cross_entropy" if task == "classification" else "mse"
    if name in ("cross_entropy", "ce"):
        return lambda out, y: F.cross_entropy(out, y)
    if name == "nll":
        return lambda out, y: F.nll_loss(out, y)
    fns = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss, "huber": F.huber_loss,
           "bce_with_logits": F.binary_cross_entropy_with_logits}
    if name not in fns:
        raise ValueError(f"unknown loss {name!r}")
    fn = fns[name]
    if task == "classification":
        return lambda out, y: fn(out, F.one_hot(y, n_outputs).to(out.dtype))
    return lambda out, y: fn(out, y.reshape(out.shape) if y.numel() == out.numel() else y)


@torch.no_grad()
def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str,
            n_outputs: int) -> dict[str, float | None]:
    """Metrics on the whole training set: accuracy (+ chance_accuracy = 1/classes) for
    classification; mse and target_variance for regression. Non-finite values become None."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(x[i:i + _EVAL_CHUNK]) for i in range(0, x.shape[0], _EVAL_CHUNK)]
    finally:
        model.train(was_training)
    out = torch.cat(outs) if outs else torch.empty(0)

    def num(v: torch.Tensor) -> float | None:
        f = float(v)
        return f if math.isfinite(f) else None

    if task == "classification":
        finite = torch.isfinite(out).all(dim=1) if out.dim() > 1 else torch.isfinite(out)
        pred = out.argmax(dim=1) if out.dim() > 1 else out
        acc = ((pred == y) & finite).double().mean()
        return {"accuracy": num(acc), "chance_accuracy": 1.0 / max(1, n_outputs)}
    target = y.reshape(out.shape) if y.numel() == out.numel() else y
    mse = ((out.double() - target.double()) ** 2).mean()
    var = target.double().var(dim=0, unbiased=False).mean()
    return {"mse": num(mse), "target_variance": num(var)}


def train(spec: Any, *, on_epoch: Callable[[dict], Any] | None = None,
          should_stop: Callable[[], bool] | None = None, device: str = "auto",
          threads: int | None = None, early_stop: bool | None = None) -> TrainResult:
    """Train a validated JobSpec (models.validation.check_spec) and record every epoch."""
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    tr = spec.training
    analysis = _attr(spec, "analysis")
    if early_stop is None:
        early_stop = bool(_attr(analysis, "early_stop", True))
    thresholds = _attr(analysis, "thresholds")
    seed = int(_attr(tr, "seed", 0) or 0)
    dev = resolve_device(device, _attr(tr, "device", "auto"))

    torch.manual_seed(seed)
    data = make_dataset(spec.data)
    built = build_model(spec)
    model = built.module.to(dev)
    model.train()
    x, y = data.x.to(dev), data.y.to(dev)
    n = x.shape[0]
    loss_fn = make_loss(_attr(tr, "loss", "auto"), data.task, data.n_outputs)
    opt = make_optimizer(model.parameters(), _attr(tr, "optimizer", "sgd"), float(tr.lr))
    clip = _attr(tr, "grad_clip")
    max_norm, max_value = _attr(clip, "max_norm"), _attr(clip, "max_value")
    batch_size = max(1, int(_attr(tr, "batch_size", 32)))
    epochs = int(_attr(tr, "epochs", 10))
    gen = torch.Generator().manual_seed(seed)
    check_every = 1 if dev.type == "cpu" else _NONFINITE_CHECK_EVERY

    result = TrainResult()
    # the service's epochs are short (1,000 samples / 32 = 32 steps): sample the activations
    # twice per epoch rather than the SDK default's once
    probe = Probe(model, sample_stride=16)
    stopped: Stopped = "completed"
    try:
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(n, generator=gen).to(dev)
            diverged = False
            cancelled = False
            for step, i in enumerate(range(0, n, batch_size)):
                if should_stop is not None and should_stop():
                    cancelled = True
                    break
                idx = perm[i:i + batch_size]
                opt.zero_grad(set_to_none=False)
                out = model(x[idx])
                loss = loss_fn(out, y[idx])
                loss.backward()
                probe.step(loss)
                if max_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(max_norm))
                elif max_value is not None:
                    torch.nn.utils.clip_grad_value_(model.parameters(), float(max_value))
                opt.step()
                if early_stop and step % check_every == 0 and not bool(torch.isfinite(loss)):
                    diverged = True
                    break
            if cancelled:  # no record for a partial epoch: the job stops now
                stopped = "cancelled"
                break
            metrics = measure(model, x, y, data.task, data.n_outputs)
            record = probe.end_epoch(epoch, metrics=metrics)
            result.records.append(record)
            result.epoch_times.append(time.perf_counter() - t0)
            if on_epoch is not None:
                on_epoch(record)
            if early_stop and (diverged or verdict_is_certain(result.records, thresholds)):
                stopped = "early_stop"
                break
            if should_stop is not None and should_stop():
                stopped = "cancelled"
                break
    finally:
        probe.close()
    result.stopped = stopped
    result.time_to_verdict_s = time.perf_counter() - t0
    if result.records:
        last = result.records[-1].get("loss")
        result.final_loss = float(last) if isinstance(last, (int, float)) and math.isfinite(last) else None
    return result

