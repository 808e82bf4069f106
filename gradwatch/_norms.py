"""Per-step gradient norms with as few dispatched ops as possible.

Measured inside a training loop on a CPU (bench/overhead.py), the cost of a per-step statistic
is set by the number of tensor ops it dispatches, more than by the bytes: each op pays ~1 us
of dispatch, and an op whose code the forward / backward / optimizer has just pushed out of
the caches pays several us more on its first call, even on one element. ``torch._foreach_norm``
on a CPU is one full reduction per tensor (a 6 x 64 MLP has 14).

So, per step, the small gradients take one op: ``torch._foreach_copy_`` into the next slot of a
persistent, zero-padded history buffer (one fused kernel on CUDA). Every ``hist_rows`` steps,
and whenever the rows are read, one ``vector_norm(dim=2)`` over the ``[steps, layers, length]``
history writes all those steps' per-layer norms into their rows at once (the values are only
read at the end of a chunk or epoch, so nothing observable changes). Within a slot, row k holds
layer k's gradients back to back, then zeros: padding adds nothing to a norm or to max |g|.
Layers are grouped so that padding never more than doubles the copied size (and by device /
dtype); the history holds at most 16 steps and ``_HIST_BYTES``. Large tensors (where the copy
would cost more than the dispatch) take the fused ``torch._foreach_norm`` at once.

Each step fills one row: [packed layer norms..., large-tensor norms...]; the probe turns a chunk
of rows into per-layer values (sqrt of the segment sum of squares) with one index_add.
"""
from __future__ import annotations

import torch
from torch import Tensor

BIG = 1 << 15          # tensors with more elements than this are not packed
_HIST_BYTES = 4 << 20  # at most this much history (per plan) for the deferred norms
_PAD_SLACK = 1 << 16   # padding allowed in a group beyond doubling (elements)


class _Group:
    """Layers packed into a persistent ``[hist_rows, n, length]`` buffer: in each step's slot,
    row k holds layer k's small gradients back to back, then zeros (never written, so they
    stay zero)."""

    def __init__(self, layout: list[list[Tensor]], length: int, hist_rows: int,
                 device: torch.device, dtype: torch.dtype, norm_dtype: torch.dtype | None):
        self.n = len(layout)      # layers (rows of a slot)
        self.norm_dtype = norm_dtype
        self.hist = torch.zeros(hist_rows, self.n, length, device=device, dtype=dtype)
        self.params: list[Tensor] = [p for params in layout for p in params]
        self.dst: list[list[Tensor]] = []   # per slot: the params' places, shaped like them
        for slot in self.hist:
            views = []
            for k, params in enumerate(layout):
                off = 0
                for p in params:
                    views.append(slot[k, off:off + p.numel()].view(p.shape))
                    off += p.numel()
            self.dst.append(views)


class NormPlan:
    """Layout of one row. ``cols_layer[c]`` = layer of norm column c. ``max_cols_layer``
    likewise for the max |g| rows (packed layers, then large tensors' maxima, then their
    minima)."""

    def __init__(self, params: list[Tensor], slot_layer: list[int], row_dtype: torch.dtype,
                 hist_rows: int = 16):
        self.params = params
        self.slot_layer = slot_layer
        self.row_dtype = row_dtype
        big: list[int] = []
        parts: dict[tuple, dict[int, list[int]]] = {}   # (device, dtype) -> layer -> slots
        for j, p in enumerate(params):
            if p.numel() > BIG or p.layout != torch.strided:
                big.append(j)
            else:
                parts.setdefault((p.device, p.dtype), {}).setdefault(slot_layer[j], []).append(j)
        self.groups: list[_Group] = []
        packed: list[tuple] = []   # (layout, length, device, dtype) per group
        cols_layer: list[int] = []
        self.slot_col: list[int] = [0] * len(params)   # column of each slot (fallback path)
        for (device, dtype), layers in parts.items():
            sized = sorted(((sum(params[j].numel() for j in slots), li, slots)
                            for li, slots in layers.items()), key=lambda t: (-t[0], t[1]))
            k = 0
            while k < len(sized):
                length = max(sized[k][0], 1)
                members = [sized[k]]
                actual = sized[k][0]
                k += 1
                while k < len(sized):
                    size = sized[k][0]
                    if (len(members) + 1) * length - (actual + size) > actual + size + _PAD_SLACK:
                        break
                    members.append(sized[k])
                    actual += size
                    k += 1
                members.sort(key=lambda t: t[1])      # layer order inside the group
                layout = []
                for size, li, slots in members:
                    for j in slots:
                        self.slot_col[j] = len(cols_layer)
                    layout.append([params[j] for j in slots])
                    cols_layer.append(li)
                packed.append((layout, length, device, dtype))
        # history depth: enough steps to amortise the norm's dispatch, bounded in memory
        packed_bytes = sum(len(lay) * length * torch.empty((), dtype=dt).element_size()
                           for lay, length, _, dt in packed)
        self.hist_rows = max(1, min(hist_rows, _HIST_BYTES // max(packed_bytes, 1)))
        col = 0
        self.group_cols: list[tuple[int, int]] = []
        for layout, length, device, dtype in packed:
            norm_dtype = None if dtype == row_dtype else row_dtype
            self.groups.append(_Group(layout, length, self.hist_rows, device, dtype, norm_dtype))
            self.group_cols.append((col, col + len(layout)))
            col += len(layout)
        self.big = [params[j] for j in big]
        self.big_cols = (len(cols_layer), len(cols_layer) + len(big))
        for j in big:
            self.slot_col[j] = len(cols_layer)
            cols_layer.append(slot_layer[j])
        self.big_dtype = None if all(params[j].dtype == row_dtype for j in big) else row_dtype
        self.cols_layer = cols_layer
        self.width = len(cols_layer)
        n_packed = self.big_cols[0]
        self.max_cols_layer = cols_layer[:n_packed] + [slot_layer[j] for j in big]
        self.max_width = n_packed + 2 * len(big)
        self.buf: Tensor | None = None
        self.slot = 0          # history slots filled since the last flush
        self.first_row = 0     # the row of slot 0
        self.last_slot = -1    # the slot written by the latest successful write

    # -------------------------------------------------------------- rows
    def attach(self, buf: Tensor) -> None:
        """The [capacity, width] row buffer the norms are written to."""
        self.buf = buf
        a, b = self.big_cols
        self.big_views = [r[a:b] for r in buf.unbind(0)]
        self.slot = 0

    def max_row_views(self, row: Tensor) -> tuple:
        views = []
        c = 0
        for g in self.groups:
            views.append(row[c:c + g.n])
            c += g.n
        nb = len(self.big)
        views.append(row[c:c + nb])
        views.append(row[c + nb:c + 2 * nb])
        return tuple(views)

    # -------------------------------------------------------------- per step
    def write(self, n: int) -> None:
        """Step for row ``n``: the small gradients into the next history slot (their norms come
        with ``flush``), the large tensors' norms into the row now. Raises on None / unusual
        gradients; the caller then flushes and takes the fallback."""
        s = self.slot
        if s == 0:
            self.first_row = n
        for g in self.groups:
            torch._foreach_copy_(g.dst[s], [p.grad for p in g.params])
        if self.big:
            grads = [p.grad for p in self.big]
            if self.big_dtype is None:
                torch.stack(torch._foreach_norm(grads), out=self.big_views[n])
            else:
                torch.stack(torch._foreach_norm(grads, 2, dtype=self.big_dtype),
                            out=self.big_views[n])
        self.last_slot = s
        self.slot = s + 1
        if s + 1 == self.hist_rows:
            self.flush()

    def flush(self) -> None:
        """Norms of every step in the history -> their rows (one op per group)."""
        m = self.slot
        if not m:
            return
        r = self.first_row
        self.slot = 0
        for g, (c0, c1) in zip(self.groups, self.group_cols):
            out = self.buf[r:r + m, c0:c1]
            if g.hist.device != out.device:   # a model split across devices
                out.copy_(torch.linalg.vector_norm(g.hist[:m], dim=2, dtype=out.dtype))
            elif g.norm_dtype is None:
                torch.linalg.vector_norm(g.hist[:m], dim=2, out=out)
            else:
                torch.linalg.vector_norm(g.hist[:m], dim=2, dtype=g.norm_dtype, out=out)

    def write_max(self, views: tuple) -> None:
        """max |g| per packed layer (from the latest step's history slot) and (max, min) per
        large tensor."""
        k = 0
        s = self.last_slot
        for g in self.groups:
            torch.amax(g.hist[s].abs(), dim=1, out=views[k])
            k += 1
        if self.big:
            mins, maxs = [], []
            for p in self.big:
                mn, mx = torch.aminmax(p.grad)
                mins.append(mn)
                maxs.append(mx)
            torch.stack(maxs, out=views[k])
            torch.stack(mins, out=views[k + 1])

    # -------------------------------------------------------------- fallback
    def fixed_grads(self) -> list[Tensor]:
        """Every slot's gradient as a dense tensor (None -> zeros, sparse -> its values)."""
        out = []
        for p in self.params:
            g = p.grad
            if g is None:
                g = torch.zeros((), device=p.device, dtype=p.dtype)
            elif g.layout != torch.strided:
                g = g.coalesce().values() if g.is_sparse else g.to_dense()
            if g.numel() == 0:
                g = torch.zeros((), device=p.device, dtype=p.dtype)
            out.append(g)
        return out

    def write_fallback(self, row: Tensor) -> None:
        """Slow but general: per-tensor norms combined into the row's columns."""
        grads = self.fixed_grads()
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64).to(row.device)
                             for g in grads])
        idx = torch.tensor(self.slot_col, device=row.device)
        sq = torch.zeros(self.width, dtype=torch.float64, device=row.device)
        sq.index_add_(0, idx, norms.square())
        row.copy_(sq.sqrt())

    def write_max_fallback(self, row: Tensor) -> None:
        grads = self.fixed_grads()
        dev = row.device
        absmax = torch.stack([g.detach().abs().max().to(dev, torch.float64) for g in grads])
        n_packed = self.big_cols[0]
        packed = torch.zeros(n_packed, dtype=torch.float64, device=dev)
        slots = [j for j, c in enumerate(self.slot_col) if c < n_packed]
        if slots:
            packed.scatter_reduce_(0, torch.tensor([self.slot_col[j] for j in slots], device=dev),
                                   absmax[slots], "amax", include_self=True)
        nb = len(self.big)
        big_slots = [j for j, c in enumerate(self.slot_col) if c >= n_packed]
        row[:n_packed].copy_(packed)
        if nb:
            vals = absmax[big_slots]
            row[n_packed:n_packed + nb].copy_(vals)
            row[n_packed + nb:].copy_(-vals)

