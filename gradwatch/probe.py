"""gradwatch.Probe: cheap per-step gradient / weight / activation statistics -> epoch records.

Cost model (what keeps it cheap):
- every step: one fused ``torch._foreach_norm`` over all gradients and one ``torch.stack`` that
  writes those per-tensor norms plus the detached loss into a row of a preallocated device
  buffer. No host sync, no per-layer Python work, and no tensor objects piling up (which would
  make Python's garbage collector the dominant cost). The per-tensor -> per-layer segment sums
  and the non-finite checks run on whole chunks of rows (every 256 steps / at ``end_epoch``).
- every ``sample_stride``-th step (the epoch's first step included): max |g| and the activation
  statistics. The activation forward hooks are only *registered* for the sampled forward, so an
  unsampled step pays nothing for them (a module with hooks takes PyTorch's slow call path).
- once per epoch: the weight snapshot for the update ratio (``_foreach_copy_``), the temporal
  profile (one batch), and one device->host transfer in ``end_epoch``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch import _temporal

DEFAULT_SAMPLE_STRIDE = 8
_CHUNK_ROWS = 256  # per-step rows kept before they are reduced to per-layer values
_ACT_FLUSH = 1024  # activation entries kept before they are stacked into one tensor

# Activation modules. kind: "relu" (ReLU family: dead_frac), "sigmoid"/"tanh" (saturated_frac),
# "other" (mean/std only).
_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "relu", nn.PReLU: "relu",
    nn.RReLU: "relu", nn.ELU: "relu", nn.CELU: "relu", nn.SELU: "relu", nn.GELU: "relu",
    nn.SiLU: "relu", nn.Mish: "relu", nn.Softplus: "relu", nn.Hardswish: "relu",
    nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.Hardtanh: "other", nn.Hardsigmoid: "other", nn.Softsign: "other",
    nn.LogSigmoid: "other", nn.Tanhshrink: "other",
}
_SATURATION_MARGIN = 0.01
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _activation_kind(mod: nn.Module) -> str | None:
    kind = _ACTIVATIONS.get(type(mod))
    if kind is not None:
        return kind
    for cls, k in _ACTIVATIONS.items():
        if isinstance(mod, cls):
            return k
    return None


def _fnorm(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor L2 norms (fused), at least float32 so half-precision norms cannot overflow."""
    if any(t.dtype in _LOW_PRECISION for t in tensors):
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return list(torch._foreach_norm(tensors))


def _num(x: float | None) -> float | None:
    """NaN / Inf -> None (JSON has no NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


class _Rows:
    """A preallocated [capacity, width] device buffer, filled one row per step.

    Rows are queued as Python lists of 0-d tensors and written ``batch`` rows at a time with one
    ``torch.stack(..., out=...)``: one op per ``batch`` steps instead of one per step, and never
    more than ``batch * width`` small tensor objects alive (a long list of them would make
    Python's garbage collector the dominant cost)."""

    def __init__(self, width: int, device: torch.device, dtype: torch.dtype, capacity: int,
                 batch: int = 16):
        self.batch = max(1, min(batch, capacity))
        capacity = max(capacity // self.batch, 1) * self.batch
        self.buf = torch.empty(capacity, width, device=device, dtype=dtype)
        self.capacity = capacity
        self.pending: list[Tensor] = []
        self.k = 0   # queued rows
        self.n = 0   # written rows

    def add(self, values: Any, last: Tensor | None = None) -> bool:
        """Queue one row (``values`` then ``last``); True when the buffer is full."""
        self.pending.extend(values)
        if last is not None:
            self.pending.append(last)
        self.k += 1
        if self.k == self.batch:
            return self._commit()
        return False

    def _commit(self) -> bool:
        k, n = self.k, self.n
        if k:
            out = self.buf[n:n + k].view(-1)
            try:
                torch.stack(self.pending, out=out)
            except RuntimeError:  # values on several devices (a model split across devices)
                out.copy_(torch.stack([v.to(out.device, out.dtype) for v in self.pending]))
            self.pending.clear()
            self.n = n + k
            self.k = 0
        return self.n == self.capacity

    def count(self) -> int:
        return self.n + self.k

    def take(self) -> Tensor:
        """The rows so far (a float64 copy); empties the buffer."""
        self._commit()
        out = self.buf[:self.n].double()
        self.n = 0
        return out

    def clear(self) -> None:
        self.pending.clear()
        self.k = self.n = 0


class Probe:
    """Hooks every module that owns parameters; ``step(loss)`` after backward (before clipping
    and ``opt.step()``); ``end_epoch(epoch)`` returns the epoch record (docs/API.md).

    ``every_step=True`` computes every statistic on every step (``sample_stride`` 1); by default
    max |g| and the activation statistics are taken every ``sample_stride``-th step (8), and the
    record says so. Gradient norms, the non-finite checks and the loss are taken on every step.
    """

    def __init__(self, model: nn.Module, every_step: bool = False, *,
                 sample_stride: int | None = None, temporal: bool = True) -> None:
        if every_step:
            stride = 1
        else:
            stride = DEFAULT_SAMPLE_STRIDE if sample_stride is None else int(sample_stride)
        if stride < 1:
            raise ValueError("sample_stride must be >= 1")
        self.model = model
        self.every_step = every_step
        self.sample_stride = stride

        # ---- layers = modules that own parameters directly, in registration order
        self._layer_names: list[str] = []
        self._layer_types: list[str] = []
        self._layer_modules: list[nn.Module] = []
        self._params: list[Tensor] = []          # one slot per (layer, parameter); ties repeat
        slot_layer: list[int] = []
        self._act_modules: list[tuple[str, nn.Module, str]] = []
        for name, mod in model.named_modules():
            own = list(mod.parameters(recurse=False))
            if own:
                li = len(self._layer_names)
                self._layer_names.append(name or "root")
                self._layer_types.append(type(mod).__name__.lower())
                self._layer_modules.append(mod)
                for p in own:
                    self._params.append(p)
                    slot_layer.append(li)
            kind = _activation_kind(mod)
            if kind is not None:
                self._act_modules.append((name or "root", mod, kind))
        self._slot_layer = slot_layer
        self._n_layers = len(self._layer_names)
        self._low_precision = any(p.dtype in _LOW_PRECISION for p in self._params)
        self._index_cache: dict[torch.device, Tensor] = {}
        self._zeros: dict = {}

        # ---- temporal: the first recurrent module
        self._rnn: tuple[str, nn.RNNBase] | None = None
        if temporal:
            for name, mod in model.named_modules():
                if isinstance(mod, nn.RNNBase):
                    self._rnn = (name or "root", mod)
                    break

        self._rows: _Rows | None = None       # per step: P norms + the loss
        self._max_rows: _Rows | None = None   # per sampled step: P maxima + P minima
        self._hooks_on = False
        self._hook_handles: list[Any] = []
        self._rnn_handles: list[Any] = []
        self._closed = False
        self._snap: list[Tensor] | None = None
        self._temporal_gen = 0
        self._reset_epoch()
        self._sync_hooks()

    # ------------------------------------------------------------------ public API
    @property
    def layers(self) -> list[dict[str, str]]:
        """[{"name", "type"}] for every module that owns parameters, in registration order."""
        return [{"name": n, "type": t} for n, t in zip(self._layer_names, self._layer_types)]

    def step(self, loss: Any = None) -> None:
        """Record the current gradients (call after backward, before clipping / opt.step()).
        No host sync."""
        i = self._i
        if self._params:
            grads = [p.grad for p in self._params]
            try:
                if self._low_precision:
                    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
                else:
                    norms = torch._foreach_norm(grads)
            except (TypeError, RuntimeError, NotImplementedError):  # None / sparse grads
                grads = self._fix_grads(grads)
                norms = self._slow_norms(grads)
        else:
            norms = ()
        if loss is None:
            lt = self._nan
            self._no_loss.append(i)
        elif isinstance(loss, Tensor):
            lt = loss.detach()
            if lt.dim() != 0:
                lt = lt.float().mean()
        else:
            lt = torch.tensor(float(loss))
        rows = self._rows
        if rows is None:
            rows = self._rows = _Rows(len(norms) + 1, self._device(), self._row_dtype(),
                                      _CHUNK_ROWS)
        if rows.add(norms, lt):
            self._take_rows()
        if i % self.sample_stride == 0 and self._params:
            self._sampled_step(i, grads)
        self._owner = None
        if self._taken:
            self._taken.clear()
        if self._temporal_fired:
            self._finish_temporal()
        self._i = i = i + 1
        if (i % self.sample_stride == 0) != self._hooks_on:
            self._sync_hooks()

    def end_epoch(self, epoch: int, metrics: dict | None = None) -> dict:
        """Aggregate the epoch's steps into a record (one device->host transfer) and reset."""
        record = self._build_record(epoch, metrics)
        self._reset_epoch()
        self._sync_hooks()
        return record

    def close(self) -> None:
        """Remove every hook the probe installed."""
        self._closed = True
        self._remove_act_hooks()
        self._remove_rnn_hooks()

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ per step helpers
    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _row_dtype(self) -> torch.dtype:
        return torch.float64 if any(p.dtype == torch.float64 for p in self._params) \
            else torch.float32

    def _fix_grads(self, grads: list) -> list[Tensor]:
        out = []
        for g, p in zip(grads, self._params):
            if g is None:
                g = self._zero_like(p)
            elif g.is_sparse:
                g = g.coalesce().values()
            if g.numel() == 0:
                g = self._zero_like(p)
            out.append(g)
        return out

    def _zero_like(self, p: Tensor) -> Tensor:
        key = (p.device, p.dtype)
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros(1, device=p.device, dtype=p.dtype)
        return z

    def _slow_norms(self, grads: list[Tensor]) -> list[Tensor]:
        return [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]

    def _sampled_step(self, i: int, grads: list) -> None:
        # max |g| = max(max g, -min g): one read pass per tensor (aminmax) and no |g| temporary
        # (foreach_abs + foreach_max allocates a copy of every gradient: ~10x slower on CPU).
        if any(g is None for g in grads):
            grads = self._fix_grads(grads)
        try:
            row = self._minmax(grads)
        except (TypeError, RuntimeError, NotImplementedError):
            row = self._minmax(self._fix_grads(grads))
        mr = self._max_rows
        if mr is None:
            mr = self._max_rows = _Rows(len(row), self._device(), self._row_dtype(),
                                        max(1, _CHUNK_ROWS // self.sample_stride), batch=4)
        if mr.add(row):
            self._take_max_rows()
        if i == 0:
            self._snapshot()

    @staticmethod
    def _minmax(grads: list[Tensor]) -> list[Tensor]:
        mins, maxs = [], []
        for g in grads:
            mn, mx = torch.aminmax(g)
            mins.append(mn)
            maxs.append(mx)
        return maxs + mins

    def _snapshot(self) -> None:
        with torch.no_grad():
            params = [p.detach() for p in self._params]
            if self._snap is None or any(s.shape != p.shape or s.device != p.device
                                         or s.dtype != p.dtype
                                         for s, p in zip(self._snap, params)):
                self._snap = [p.clone() for p in params]
            else:
                torch._foreach_copy_(self._snap, params)
        self._snap_valid = True

    def _index(self, device: torch.device) -> Tensor:
        idx = self._index_cache.get(device)
        if idx is None:
            idx = self._index_cache[device] = torch.tensor(self._slot_layer, device=device,
                                                           dtype=torch.long)
        return idx

    def _take_rows(self) -> None:
        """Reduce the buffered per-step rows: per-tensor norms -> per-layer squared norms."""
        rows = self._rows.take()                        # [r, P + 1] float64
        P = len(self._params)
        self._loss_chunks.append(rows[:, P])
        if P:
            sq = torch.zeros(rows.shape[0], self._n_layers, dtype=torch.float64,
                             device=rows.device)
            sq.index_add_(1, self._index(rows.device), rows[:, :P].square())
            self._sq_chunks.append(sq)

    def _take_max_rows(self) -> None:
        rows = self._max_rows.take()                    # [r, 2P]: maxima then minima
        P = len(self._params)
        absmax = torch.maximum(rows[:, :P], -rows[:, P:])  # NaN propagates
        idx = self._index(rows.device).expand(rows.shape[0], P)
        out = torch.zeros(rows.shape[0], self._n_layers, dtype=torch.float64, device=rows.device)
        out.scatter_reduce_(1, idx, absmax, "amax", include_self=False)
        self._max_chunks.append(out)

    # ------------------------------------------------------------------ activation hooks
    def _sync_hooks(self) -> None:
        """Register the activation forward hooks iff the next step is sampled, and the temporal
        hooks iff the epoch's temporal batch is still to come."""
        if self._closed:
            return
        want = self._i % self.sample_stride == 0 and bool(self._act_modules)
        if want and not self._hooks_on:
            # activation hooks first: on a PReLU (an activation that owns a parameter) the
            # activation hook must see the previous layer as owner before the PReLU's own
            # layer hook makes it the owner of what follows.
            for name, mod, kind in self._act_modules:
                self._hook_handles.append(
                    mod.register_forward_hook(functools.partial(self._act_hook, name, kind)))
            for li, mod in enumerate(self._layer_modules):
                self._hook_handles.append(
                    mod.register_forward_hook(functools.partial(self._layer_hook, li)))
            self._hooks_on = True
        elif not want and self._hooks_on:
            self._remove_act_hooks()
        if self._rnn is not None and self._temporal_pending and not self._rnn_handles:
            mod = self._rnn[1]
            self._rnn_handles.append(
                mod.register_forward_pre_hook(self._rnn_pre_hook, with_kwargs=True))
            self._rnn_handles.append(
                mod.register_forward_hook(self._rnn_hook, with_kwargs=True))

    def _remove_act_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        self._hooks_on = False

    def _remove_rnn_hooks(self) -> None:
        for h in self._rnn_handles:
            h.remove()
        self._rnn_handles = []

    def _layer_hook(self, li: int, mod: nn.Module, inp: Any, out: Any) -> None:
        self._owner = li

    def _act_hook(self, name: str, kind: str, mod: nn.Module, inp: Any, out: Any) -> None:
        """Statistics of the first activation after a layer, reduced at once (the tensor is
        not kept): sum, L2 norm (-> pooled mean / std), and the saturated count (sigmoid,
        tanh) or the count of live units (ReLU family). A handful of ops, all on the device;
        the operand is detached, so no autograd graph is built."""
        owner = self._owner
        if owner is None or owner in self._taken or not torch.is_grad_enabled():
            return
        self._taken.add(owner)
        if not isinstance(out, Tensor) or not out.is_floating_point() or out.numel() == 0:
            return
        y = out.detach()
        s1 = y.sum(dtype=torch.float32)
        s2 = torch.linalg.vector_norm(y, dtype=torch.float32)
        if kind == "sigmoid":   # within 0.01 of 0 or 1
            extra = y.sub(0.5).abs_().gt_(0.5 - _SATURATION_MARGIN).sum(dtype=torch.float32)
        elif kind == "tanh":    # within 0.01 of -1 or 1
            extra = y.abs().gt_(1.0 - _SATURATION_MARGIN).sum(dtype=torch.float32)
        elif kind == "relu":    # live units: > 0 for at least one sample of the batch
            extra = torch.count_nonzero((y.amax(0) if y.dim() >= 2 else y).clamp(min=0))
        else:
            extra = s1          # placeholder, unused
        units = y[0].numel() if y.dim() >= 2 else y.numel()
        self._act_meta.append((owner, name, kind, y.numel(), units))
        self._act_vals.extend((s1, s2, extra))
        if len(self._act_meta) >= _ACT_FLUSH:
            self._take_act_entries()

    def _take_act_entries(self) -> None:
        vals = self._act_vals
        try:
            stacked = torch.stack(vals).double()
        except RuntimeError:  # several devices
            dev = self._device()
            stacked = torch.stack([t.to(dev, torch.float64) for t in vals])
        self._act_chunks.append((self._act_meta, stacked))
        self._act_meta, self._act_vals = [], []

    # ------------------------------------------------------------------ temporal
    def _rnn_pre_hook(self, mod: nn.RNNBase, args: tuple, kwargs: dict) -> Any:
        """wrt "input": route the input sequence through a view carrying a gradient hook."""
        if not (self._temporal_pending and torch.is_grad_enabled()):
            return None
        x, hx = _temporal._split_call(args, kwargs)
        packed = isinstance(x, _temporal.PackedSequence)
        if _temporal.hidden_supported(mod) and not packed:
            return None  # handled by _rnn_hook (wrt hidden)
        gen = self._new_temporal_gen("input")
        data = x.data if packed else x
        if data.requires_grad:
            data = data.view_as(data)
        else:
            data = data.detach().requires_grad_(True)
        batch_first = mod.batch_first
        ref = x

        def hook(g: Tensor) -> None:
            if gen == self._temporal_gen:
                self._temporal_parts = [_temporal.time_norms_of_input_grad(g, ref, batch_first)]
                self._temporal_fired = True

        data.register_hook(hook)
        new_x = x._replace(data=data) if packed else data
        if args:
            args = (new_x,) + tuple(args[1:])
        else:
            kwargs = dict(kwargs, input=new_x)
        return args, kwargs

    def _rnn_hook(self, mod: nn.RNNBase, args: tuple, kwargs: dict, output: Any) -> Any:
        """wrt "hidden": replace the fused output by the explicit unroll (same values)."""
        if not (self._temporal_pending and torch.is_grad_enabled()):
            return None
        x, hx = _temporal._split_call(args, kwargs)
        if not _temporal.hidden_supported(mod) or isinstance(x, _temporal.PackedSequence):
            return None
        gen = self._new_temporal_gen("hidden")
        T = x.shape[0] if (x.dim() == 2 or not mod.batch_first) else x.shape[1]
        self._temporal_parts = [None] * T

        def on_hidden(t: int, h: Tensor) -> None:
            if h.requires_grad:
                h.register_hook(functools.partial(self._hidden_grad, gen, t))

        return _temporal.unroll(mod, x, hx, on_hidden)

    def _hidden_grad(self, gen: int, t: int, g: Tensor) -> None:
        if gen == self._temporal_gen:
            self._temporal_parts[t] = torch.linalg.vector_norm(g, dtype=torch.float32)
            self._temporal_fired = True

    def _new_temporal_gen(self, wrt: str) -> int:
        self._temporal_gen += 1
        self._temporal_wrt = wrt
        self._temporal_fired = False
        return self._temporal_gen

    def _finish_temporal(self) -> None:
        parts = self._temporal_parts
        ref = next(p for p in parts if p is not None)
        zero = torch.zeros(1, device=ref.device, dtype=torch.float32)
        vec = torch.cat([p.reshape(-1) if p is not None else zero for p in parts])
        self._temporal_result = (self._temporal_wrt, vec)
        self._temporal_pending = False
        self._temporal_fired = False
        self._temporal_gen += 1  # later backward passes through old graphs are ignored
        self._temporal_parts = []
        self._remove_rnn_hooks()

    # ------------------------------------------------------------------ epoch record
    def _reset_epoch(self) -> None:
        self._i = 0
        if self._rows is not None:
            self._rows.clear()
        if self._max_rows is not None:
            self._max_rows.clear()
        self._sq_chunks: list[Tensor] = []
        self._loss_chunks: list[Tensor] = []
        self._max_chunks: list[Tensor] = []
        self._no_loss: list[int] = []
        self._nan = torch.tensor(math.nan, device=self._device())
        self._act_meta: list[tuple] = []
        self._act_vals: list[Tensor] = []
        self._act_chunks: list[tuple] = []
        self._owner: int | None = None
        self._taken: set[int] = set()
        self._snap_valid = False
        self._temporal_pending = self._rnn is not None
        self._temporal_fired = False
        self._temporal_gen += 1
        self._temporal_wrt = "hidden"
        self._temporal_parts: list = []
        self._temporal_result: tuple[str, Tensor] | None = None

    def _build_record(self, epoch: int, metrics: dict | None) -> dict:
        if self._rows is not None and self._rows.count():
            self._take_rows()
        if self._max_rows is not None and self._max_rows.count():
            self._take_max_rows()
        if self._act_meta:
            self._take_act_entries()
        L = self._n_layers
        dev = self._device()
        steps = self._i
        f64 = torch.float64
        out: list[Tensor] = []   # everything that crosses to the host, flattened, in order
        sizes: list[int] = []

        def put(t: Tensor) -> None:
            t = t.detach().to(device=dev, dtype=f64).reshape(-1)
            out.append(t)
            sizes.append(t.numel())

        # gradient norms [S, L]: statistics over the steps whose norm is finite
        have_grads = bool(self._sq_chunks) and L > 0
        if have_grads:
            norms = torch.cat(self._sq_chunks).sqrt()
            fin = torch.isfinite(norms)
            cnt = fin.sum(0)
            inf = torch.full_like(norms, math.inf)
            put(torch.where(fin, norms, 0.0).sum(0) / cnt)              # mean (nan if cnt 0)
            put(torch.where(fin, norms, inf).amin(0))                    # min
            put(torch.where(fin, norms, -inf).amax(0))                   # max
            put(norms[0])                                                # first
            put(norms[-1])                                               # last
            srt = torch.where(fin, norms, inf).sort(0).values
            lo = ((cnt - 1).clamp(min=0) // 2).unsqueeze(0)
            hi = (cnt // 2).clamp(max=norms.shape[0] - 1).unsqueeze(0)
            put((srt.gather(0, lo) + srt.gather(0, hi)).squeeze(0) / 2)  # median
            put(norms.shape[0] - cnt)                                    # nonfinite steps
        have_max = bool(self._max_chunks) and L > 0
        if have_max:
            mx = torch.cat(self._max_chunks)
            put(torch.where(torch.isfinite(mx), mx, -math.inf).amax(0))
        # weights
        if L > 0:
            with torch.no_grad():
                params = [p.detach() for p in self._params]
                idx = self._index(dev)
                wn = torch.stack(_fnorm(params)).to(dev, f64)
                put(torch.zeros(L, dtype=f64, device=dev).index_add_(0, idx, wn.square()).sqrt())
                if self._snap_valid:
                    diff = torch._foreach_sub(params, self._snap)
                    dn = torch.stack(_fnorm(diff)).to(dev, f64)
                    sn = torch.stack(_fnorm(self._snap)).to(dev, f64)
                    num = torch.zeros(L, dtype=f64, device=dev).index_add_(0, idx, dn.square())
                    den = torch.zeros(L, dtype=f64, device=dev).index_add_(0, idx, sn.square())
                    put(num.sqrt() / den.sqrt())
        # losses
        have_loss = bool(self._loss_chunks)
        if have_loss:
            put(torch.cat(self._loss_chunks))
        # activations
        act_meta: list = []
        for meta, stacked in self._act_chunks:
            act_meta.extend(meta)
            put(stacked)
        # temporal
        if self._temporal_result is not None:
            put(self._temporal_result[1])

        host: list[float] = torch.cat(out).tolist() if out else []  # the one host sync
        pos = 0

        def take() -> list[float]:
            nonlocal pos
            n = sizes.pop(0)
            vals = host[pos:pos + n]
            pos += n
            return vals

        nan_l = [math.nan] * L
        if have_grads:
            g_mean, g_min, g_max, g_first, g_last, g_med, g_bad = (take() for _ in range(7))
        else:
            g_mean = g_min = g_max = g_first = g_last = g_med = nan_l
            g_bad = [0.0] * L
        g_abs = take() if have_max else nan_l
        w_norm = take() if L > 0 else []
        u_ratio = take() if (L > 0 and self._snap_valid) else nan_l
        loss_vals = take() if have_loss else []
        act_vals: list[float] = []
        for _ in self._act_chunks:
            act_vals.extend(take())
        temporal_vals = take() if self._temporal_result is not None else None

        # activation pooling (host, float64): pooled mean / population std over sampled batches
        acc: dict[int, list] = {}
        for k, (owner, name, kind, numel, units) in enumerate(act_meta):
            s1, norm, extra = act_vals[3 * k: 3 * k + 3]
            a = acc.setdefault(owner, [name, 0.0, 0.0, 0, 0.0, 0.0, 0])
            a[1] += s1
            a[2] += norm * norm
            a[3] += numel
            if kind in ("sigmoid", "tanh"):
                a[4] += extra
            elif kind == "relu":
                a[5] += (units - extra) / units
            a[6] += 1

        layer_recs = []
        nonfinite_grads_any = False
        for li in range(L):
            bad = int(g_bad[li])
            nonfinite_grads_any |= bad > 0
            a = acc.get(li)
            if a is None:
                activation = None
            else:
                name, s1, s2, n, sat, dead, batches = a
                mean = s1 / n
                var = max(s2 / n - mean * mean, 0.0)
                activation = {
                    "mean": _num(mean), "std": _num(math.sqrt(var)),
                    "saturated_frac": _num(sat / n), "dead_frac": _num(dead / batches),
                    "module": name,
                }
            layer_recs.append({
                "name": self._layer_names[li],
                "type": self._layer_types[li],
                "grad_norm": {
                    "mean": _num(g_mean[li]), "min": _num(g_min[li]), "max": _num(g_max[li]),
                    "last": _num(g_last[li]), "first": _num(g_first[li]),
                    "median": _num(g_med[li]),
                },
                "grad_max_abs": _num(g_abs[li]),
                "weight_norm": _num(w_norm[li]),
                "update_ratio": _num(u_ratio[li]),
                "nonfinite_grads": bad,
                "activation": activation,
            })

        if self._no_loss:
            skip = set(self._no_loss)
            loss_vals = [v for k, v in enumerate(loss_vals) if k not in skip]
        loss_finite = all(math.isfinite(x) for x in loss_vals)
        if loss_vals:
            finite_losses = [x for x in loss_vals if math.isfinite(x)]
            loss = math.fsum(loss_vals) / len(loss_vals) if loss_finite else None
            loss_stats = {
                "first": _num(loss_vals[0]), "last": _num(loss_vals[-1]),
                "min": _num(min(finite_losses)) if finite_losses else None,
                "max": _num(max(finite_losses)) if finite_losses else None,
            }
        else:
            loss, loss_stats = None, None

        temporal = None
        if temporal_vals is not None and self._rnn is not None:
            temporal = {"layer": self._rnn[0], "wrt": self._temporal_result[0],
                        "grad_norm_by_step": [_num(x) for x in temporal_vals]}

        return {
            "epoch": epoch,
            "loss": _num(loss) if loss is not None else None,
            "metrics": {k: (_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                            else v) for k, v in (metrics or {}).items()},
            "nonfinite": (not loss_finite) or nonfinite_grads_any,
            "steps": steps,
            "sample_stride": self.sample_stride,
            "loss_stats": loss_stats,
            "layers": layer_recs,
            "temporal": temporal,
        }


__all__ = ["Probe", "DEFAULT_SAMPLE_STRIDE"]
