"""gradwatch.Probe: cheap per-step gradient / weight / activation statistics -> epoch records.

Cost model (what keeps it cheap; see bench/overhead.py):
- every step: the per-layer gradient norms at the cost of one dispatched op for the small
  gradients (gradwatch/_norms.py: one ``_foreach_copy_`` into a persistent padded history; one
  ``vector_norm`` per 16 steps writes their norms into the steps' rows of a preallocated device
  buffer) and the fused ``torch._foreach_norm`` for large ones; the loss is kept as an alias
  (``.data``, no op) and stacked once per chunk. No host sync, no per-layer Python work; the
  rare steps around a sampled one take a separate path (``_event``). Non-finite gradients show
  as a non-finite norm: the count is taken from the rows.
- every ``sample_stride``-th step (the epoch's first step included): max |g| and the activation
  statistics. The activation forward hooks are only present for the sampled forward (a module
  with hooks takes PyTorch's slow call path), toggled by a dict insert / pop.
- once per epoch: the weight snapshot for the update ratio (``_foreach_copy_``), the temporal
  profile (one batch, gradwatch/_temporal.py), and one device->host transfer in ``end_epoch``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch import _temporal
from gradwatch._norms import NormPlan

DEFAULT_SAMPLE_STRIDE = 32  # bench/overhead.py: 16 cost the 6 x 64 ReLU MLP ~1% more
_CHUNK_ROWS = 256  # per-step rows kept before they are reduced to per-layer values
_HOST_STATS = 1 << 17  # [steps x layers] values up to which epoch statistics are host-side
_ACT_FLUSH = 1024  # activation entries kept before they are stacked into one tensor

# Activation modules. kind: "relu" (ReLU family: dead_frac; "relu0" when the output is >= 0),
# "sigmoid"/"tanh" (saturated_frac), "other" (mean/std only).
_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu0", nn.ReLU6: "relu0", nn.LeakyReLU: "relu", nn.PReLU: "relu",
    nn.RReLU: "relu", nn.ELU: "relu", nn.CELU: "relu", nn.SELU: "relu", nn.GELU: "relu",
    nn.SiLU: "relu", nn.Mish: "relu", nn.Softplus: "relu0", nn.Hardswish: "relu",
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


def _stack(ts: list[Tensor], dev: torch.device) -> Tensor:
    try:
        return torch.stack(ts)
    except RuntimeError:  # tensors on several devices (a model split across devices)
        return torch.stack([t.to(dev) for t in ts])


def _num(x: float | None) -> float | None:
    """NaN / Inf -> None (JSON has no NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


class _Rows:
    """A preallocated [capacity, width] device buffer, one row per step; ``views`` (optional)
    holds, per row, the slices each part of the row is written to (made once: no indexing op
    per step)."""

    def __init__(self, width: int, device: torch.device, dtype: torch.dtype, capacity: int,
                 make_views: Any):
        self.buf = torch.empty(capacity, width, device=device, dtype=dtype)
        self.rows = list(self.buf.unbind(0))
        self.views = [make_views(r) for r in self.rows] if make_views is not None else None
        self.capacity = capacity
        self.n = 0

    def take(self) -> Tensor:
        """The rows so far (a float64 copy); empties the buffer."""
        out = self.buf[:self.n].double()
        self.n = 0
        return out


class Probe:
    """Hooks every module that owns parameters; ``step(loss)`` after backward (before clipping
    and ``opt.step()``); ``end_epoch(epoch)`` returns the epoch record (docs/API.md).

    ``every_step=True`` computes every statistic on every step (``sample_stride`` 1); by default
    max |g| and the activation statistics are taken every ``sample_stride``-th step (32), and the
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
        self._index_cache: dict[torch.device, Tensor] = {}

        # ---- temporal: the first recurrent module
        self._rnn: tuple[str, nn.RNNBase] | None = None
        if temporal:
            for name, mod in model.named_modules():
                if isinstance(mod, nn.RNNBase):
                    self._rnn = (name or "root", mod)
                    break

        self._plan: NormPlan | None = None
        self._rows: _Rows | None = None       # per step: the plan's norm columns
        self._max_rows: _Rows | None = None   # per sampled step: max |g| columns
        self._hooks_on = False
        self._specs: list[tuple[dict, int, Any]] | None = None
        self._reserved: list[Any] = []
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
        if isinstance(loss, Tensor):
            lt = loss.data   # an alias without autograd (no op dispatched), kept as is
            if lt.ndim:
                lt = lt.float().mean()
        elif loss is None:
            lt = self._nan
            self._no_loss.append(i)
        else:  # a Python number
            lt = torch.tensor(float(loss))
        self._losses.append(lt)   # stacked once per chunk
        if i >= self._next_event and i % self.sample_stride == 0:
            self._check_plan()   # layers frozen / unfrozen since the plan was made
        rows = self._rows
        if rows is None:
            rows = self._make_rows()
        n = rows.n
        try:
            self._plan.write(n)
            loaded = True
        except (TypeError, RuntimeError, NotImplementedError, AttributeError):
            loaded = False   # None / sparse / reshaped gradients: the general (slow) path
            self._plan.flush()
            self._plan.write_fallback(rows.rows[n])
        rows.n = n + 1
        if n + 1 == rows.capacity:
            self._take_rows()
        self._i = i + 1
        if i >= self._next_event or self._temporal_fired:
            self._event(i, loaded)

    def _event(self, i: int, loaded: bool) -> None:
        """The steps around a sampled one (and the temporal batch): kept off the common path."""
        stride = self.sample_stride
        if i % stride == 0 and self._params:
            self._sampled_step(i, loaded)
        self._owner = None
        if self._taken:
            self._taken.clear()
        if self._temporal_fired:
            self._finish_temporal()
        j = i + 1
        if (j % stride == 0) != self._hooks_on:
            self._sync_hooks()
        # next: the step before a sampled one (hooks on), or the sampled one itself
        r = j % stride
        self._next_event = j if r in (0, stride - 1) else j + (stride - 1 - r)

    def end_epoch(self, epoch: int, metrics: dict | None = None) -> dict:
        """Aggregate the epoch's steps into a record (one device->host transfer) and reset."""
        record = self._build_record(epoch, metrics)
        self._reset_epoch()
        self._sync_hooks()
        return record

    def close(self) -> None:
        """Remove every hook the probe installed."""
        self._remove_act_hooks()
        self._remove_rnn_hooks()
        for h in self._reserved:
            h.remove()
        self._reserved = []
        self._closed = True

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

    def _make_rows(self) -> _Rows:
        """The norm plan over the trainable parameters (a frozen one has no gradient: it adds
        nothing to its layer's norm, and must not send every step down the fallback path)."""
        dev, dt = self._device(), self._row_dtype()
        self._plan_key = key = tuple(p.requires_grad for p in self._params)
        active = [j for j, trainable in enumerate(key) if trainable]
        self._plan = plan = NormPlan([self._params[j] for j in active],
                                     [self._slot_layer[j] for j in active], dt)
        self._rows = _Rows(plan.width, dev, dt, _CHUNK_ROWS, None)
        plan.attach(self._rows.buf)
        self._cols_layer = torch.tensor(plan.cols_layer, device=dev, dtype=torch.long)
        self._max_cols_layer = torch.tensor(plan.max_cols_layer, device=dev, dtype=torch.long)
        return self._rows

    def _sampled_step(self, i: int, loaded: bool) -> None:
        """max |g| per layer: the packed buffers of this step (abs + amax per group) and
        aminmax for each large tensor (one read pass, no |g| temporary)."""
        mr = self._max_rows
        if mr is None:
            plan = self._plan
            mr = self._max_rows = _Rows(plan.max_width, self._device(), self._row_dtype(),
                                        max(1, _CHUNK_ROWS // self.sample_stride),
                                        plan.max_row_views)
        n = mr.n
        try:
            if not loaded:
                raise RuntimeError("fallback")
            self._plan.write_max(mr.views[n])
        except (TypeError, RuntimeError, NotImplementedError, AttributeError):
            self._plan.write_max_fallback(mr.rows[n])
        mr.n = n + 1
        if n + 1 == mr.capacity:
            self._take_max_rows()
        if i == 0:
            self._snapshot()

    def _check_plan(self) -> None:
        """Layers frozen or unfrozen since the plan was made (checked before each sampled step,
        the epoch's first included, not on every step): reduce the rows so far, then re-plan."""
        if self._plan is None or tuple(p.requires_grad for p in self._params) == self._plan_key:
            return
        if self._rows.n:
            self._take_rows()
        if self._max_rows is not None and self._max_rows.n:
            self._take_max_rows()
        self._plan = self._rows = self._max_rows = None   # the next step makes new ones

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
        """Reduce the buffered per-step rows: norm columns -> per-layer squared norms."""
        self._plan.flush()                              # the deferred norms
        rows = self._rows.take()                        # [r, width] float64
        self._take_losses()
        if self._n_layers:
            if self._plan.cols_layer == list(range(self._n_layers)):  # one column per layer
                sq = rows.square()
            else:
                sq = torch.zeros(rows.shape[0], self._n_layers, dtype=torch.float64,
                                 device=rows.device)
                sq.index_add_(1, self._cols_layer, rows.square())
            self._sq_chunks.append(sq)

    def _take_losses(self) -> None:
        losses, self._losses = self._losses, []
        if not losses:
            return
        dev = self._device()
        try:
            stacked = torch.stack(losses)
        except RuntimeError:  # losses on another device or of several dtypes
            stacked = torch.stack([t.to(dev, torch.float64) for t in losses])
        self._loss_chunks.append(stacked.to(dev, torch.float64))

    def _take_max_rows(self) -> None:
        rows = self._max_rows.take()                    # [r, packed + 2 * big]
        plan = self._plan
        n_packed = plan.big_cols[0]
        nb = len(plan.big)
        if nb:
            big = torch.maximum(rows[:, n_packed:n_packed + nb], -rows[:, n_packed + nb:])
            absmax = torch.cat([rows[:, :n_packed], big], dim=1)  # NaN propagates
        else:
            absmax = rows
        if plan.max_cols_layer == list(range(self._n_layers)):  # one column per layer
            self._max_chunks.append(absmax)
            return
        idx = self._max_cols_layer.expand(rows.shape[0], -1)
        out = torch.zeros(rows.shape[0], self._n_layers, dtype=torch.float64, device=rows.device)
        out.scatter_reduce_(1, idx, absmax, "amax", include_self=False)
        self._max_chunks.append(out)

    # ------------------------------------------------------------------ activation hooks
    def _hook_specs(self) -> list[tuple[dict, int, Any]]:
        """(hook dict, id, hook) for every activation / layer forward hook. The ids are
        reserved once with a RemovableHandle; toggling is then a dict insert / pop, because
        ``register_forward_hook`` + ``handle.remove()`` cost ~100x more than that and the hooks
        are toggled twice every ``sample_stride`` steps."""
        if self._specs is None:
            from torch.utils.hooks import RemovableHandle

            specs = []
            # activation hooks first: on a PReLU (an activation that owns a parameter) the
            # activation hook must see the previous layer as owner before the PReLU's own
            # layer hook makes it the owner of what follows.
            mods = [(mod, functools.partial(self._act_hook, name, kind))
                    for name, mod, kind in self._act_modules]
            mods += [(mod, functools.partial(self._layer_hook, li))
                     for li, mod in enumerate(self._layer_modules)]
            for mod, fn in mods:
                handle = RemovableHandle(mod._forward_hooks, extra_dict=[
                    mod._forward_hooks_with_kwargs, mod._forward_hooks_always_called])
                self._reserved.append(handle)
                specs.append((mod._forward_hooks, handle.id, fn))
            self._specs = specs
        return self._specs

    def _sync_hooks(self) -> None:
        """Activation forward hooks present iff the next step is sampled; the temporal hooks
        iff the epoch's temporal batch is still to come."""
        if self._closed:
            return
        want = self._i % self.sample_stride == 0 and bool(self._act_modules)
        if want and not self._hooks_on:
            for d, hid, fn in self._hook_specs():
                d[hid] = fn
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
        if self._hooks_on:
            for d, hid, _ in self._specs:
                d.pop(hid, None)
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
            extra = torch.count_nonzero(y.sub(0.5).abs_().gt_(0.5 - _SATURATION_MARGIN))
        elif kind == "tanh":    # within 0.01 of -1 or 1
            extra = torch.count_nonzero(y.abs().gt_(1.0 - _SATURATION_MARGIN))
        elif kind == "relu0":   # live units: > 0 for at least one sample of the batch
            extra = torch.count_nonzero(y.amax(0) if y.dim() >= 2 else y)
        elif kind == "relu":
            extra = torch.count_nonzero((y.amax(0) if y.dim() >= 2 else y).clamp(min=0))
        else:
            extra = None
        units = y[0].numel() if y.dim() >= 2 else y.numel()
        self._act_meta.append((owner, name, kind, y.numel(), units))
        self._act_vals.append(s1)
        self._act_vals.append(s2)
        if extra is not None:
            self._act_counts.append(extra)
        if len(self._act_meta) >= _ACT_FLUSH:
            self._take_act_entries()

    def _take_act_entries(self) -> None:
        """Stack the queued activation reductions: floats (sum, norm per entry) and counts
        (one per entry that has one) -> one float64 tensor, floats first."""
        dev = self._device()
        parts = [_stack(self._act_vals, dev).double()]
        if self._act_counts:
            parts.append(_stack(self._act_counts, dev).double())
        try:
            stacked = torch.cat(parts)
        except RuntimeError:  # several devices
            stacked = torch.cat([p.to(dev) for p in parts])
        self._act_chunks.append((self._act_meta, stacked))
        self._act_meta, self._act_vals, self._act_counts = [], [], []

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
        self._next_event = 0
        if self._plan is not None:
            self._plan.slot = 0
        if self._rows is not None:
            self._rows.n = 0
        if self._max_rows is not None:
            self._max_rows.n = 0
        self._sq_chunks: list[Tensor] = []
        self._loss_chunks: list[Tensor] = []
        self._losses: list[Tensor] = []   # this chunk's detached losses, one per step
        self._max_chunks: list[Tensor] = []
        self._no_loss: list[int] = []
        self._nan = torch.tensor(math.nan, device=self._device())
        self._act_meta: list[tuple] = []
        self._act_vals: list[Tensor] = []
        self._act_counts: list[Tensor] = []
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
        if self._rows is not None and self._rows.n:
            self._take_rows()
        self._take_losses()
        if self._max_rows is not None and self._max_rows.n:
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

        # gradient norms [S, L]: statistics over the steps whose norm is finite. Usually
        # small: then the raw per-step values cross to the host and the statistics are plain
        # Python (a few dozen tiny device ops cost more than that); else reduced on the device.
        have_grads = bool(self._sq_chunks) and L > 0
        host_grads = False
        if have_grads:
            sq = torch.cat(self._sq_chunks)
            host_grads = sq.numel() <= _HOST_STATS
            if host_grads:
                put(sq)
            else:
                norms = sq.sqrt()
                fin = torch.isfinite(norms)
                cnt = fin.sum(0)
                inf = torch.full_like(norms, math.inf)
                put(torch.where(fin, norms, 0.0).sum(0) / cnt)              # mean
                put(torch.where(fin, norms, inf).amin(0))                    # min
                put(torch.where(fin, norms, -inf).amax(0))                   # max
                put(norms[0])                                                # first
                put(norms[-1])                                               # last
                srt = torch.where(fin, norms, inf).sort(0).values
                lo = ((cnt - 1).clamp(min=0) // 2).unsqueeze(0)
                hi = (cnt // 2).clamp(max=norms.shape[0] - 1).unsqueeze(0)
                put((srt.gather(0, lo) + srt.gather(0, hi)).squeeze(0) / 2)  # median
                put(norms.shape[0] - cnt)                                    # nonfinite
        have_max = bool(self._max_chunks) and L > 0
        host_max = False
        if have_max:
            mx = torch.cat(self._max_chunks)
            host_max = mx.numel() <= _HOST_STATS
            put(mx if host_max else torch.where(torch.isfinite(mx), mx, -math.inf).amax(0))
        # weights
        if L > 0:
            with torch.no_grad():
                params = [p.detach() for p in self._params]
                idx = self._index(dev)
                L2 = _fnorm(params)
                if self._snap_valid:
                    L2 += _fnorm(torch._foreach_sub(params, self._snap)) + _fnorm(self._snap)
                k = len(L2) // len(params)   # 1, or 3 with the snapshot: now, diff, start
                sq = _stack(L2, dev).to(dev, f64).square().view(k, -1)
                per = torch.zeros(k, L, dtype=f64, device=dev).index_add_(1, idx, sq).sqrt()
                put(per[0])
                if self._snap_valid:
                    put(per[1] / per[2])
        # losses
        have_loss = bool(self._loss_chunks)
        if have_loss:
            put(torch.cat(self._loss_chunks))
        # activations
        for _, stacked in self._act_chunks:
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
        if have_grads and host_grads:
            raw = take()
            g_mean, g_min, g_max, g_first, g_last, g_med, g_bad = [], [], [], [], [], [], []
            for li in range(L):
                col = [math.sqrt(v) for v in raw[li::L]]
                fin = sorted(v for v in col if math.isfinite(v))
                n = len(fin)
                g_first.append(col[0])
                g_last.append(col[-1])
                g_bad.append(len(col) - n)
                if n:
                    g_mean.append(math.fsum(fin) / n)
                    g_min.append(fin[0])
                    g_max.append(fin[-1])
                    g_med.append((fin[(n - 1) // 2] + fin[n // 2]) / 2)
                else:
                    g_mean.append(math.nan)
                    g_min.append(math.nan)
                    g_max.append(math.nan)
                    g_med.append(math.nan)
        elif have_grads:
            g_mean, g_min, g_max, g_first, g_last, g_med, g_bad = (take() for _ in range(7))
        else:
            g_mean = g_min = g_max = g_first = g_last = g_med = nan_l
            g_bad = [0.0] * L
        if have_max and host_max:
            raw = take()
            g_abs = []
            for li in range(L):
                fin = [v for v in raw[li::L] if math.isfinite(v)]
                g_abs.append(max(fin) if fin else math.nan)
        elif have_max:
            g_abs = take()
        else:
            g_abs = nan_l
        w_norm = take() if L > 0 else []
        u_ratio = take() if (L > 0 and self._snap_valid) else nan_l
        loss_vals = take() if have_loss else []
        act_entries: list[tuple] = []   # (meta, s1, norm, count or None)
        for meta, _ in self._act_chunks:
            vals = take()
            n = len(meta)
            counts = iter(vals[2 * n:])
            for k, mt in enumerate(meta):
                cnt = next(counts) if mt[2] != "other" else None
                act_entries.append((mt, vals[2 * k], vals[2 * k + 1], cnt))
        temporal_vals = take() if self._temporal_result is not None else None

        # activation pooling (host, float64): pooled mean / population std over sampled batches
        acc: dict[int, list] = {}
        for (owner, name, kind, numel, units), s1, norm, extra in act_entries:
            a = acc.setdefault(owner, [name, 0.0, 0.0, 0, 0.0, 0.0, 0])
            a[1] += s1
            a[2] += norm * norm
            a[3] += numel
            if kind in ("sigmoid", "tanh"):
                a[4] += extra
            elif kind in ("relu", "relu0"):
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
