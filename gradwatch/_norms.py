"""Per-step gradient norms with as few dispatched ops as possible.

On a CPU, ``torch._foreach_norm`` loops over the tensors and pays a full reduction dispatch
for each (a few microseconds), which for a small model (a 6 x 64 MLP has 14 parameter tensors
and a step of ~1 ms) is most of the probe's cost. Small gradients are therefore packed: the
small tensors of each layer are laid out back to back, each layer padded with zeros to a common
length, with ``flatten_dense_tensors`` (one C++ call), and one ``vector_norm(dim=1)`` over the
``[layers, length]`` view gives every layer's norm at once (the zero padding adds nothing to a
norm or to max |g|). Large tensors (where the copy would cost more than the dispatch) go through
the fused ``torch._foreach_norm``. Layers are grouped so that padding never more than doubles
the copied size (and by device / dtype).

Each step writes one row: [packed layer norms..., large-tensor norms..., loss]; the probe turns
a chunk of rows into per-layer values (sqrt of the segment sum of squares) with one index_add.
"""
from __future__ import annotations

import torch
from torch import Tensor

BIG = 1 << 15          # tensors with more elements than this are not packed
_PAD_SLACK = 1 << 16   # padding allowed in a group beyond doubling (elements)

try:
    _flatten = torch._C._nn.flatten_dense_tensors
except AttributeError:  # pragma: no cover - very old / unusual builds
    def _flatten(ts: list[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])


class _Pad:
    """Stands in a packed group's parameter list: ``.grad`` is a zero tensor."""

    __slots__ = ("grad",)

    def __init__(self, grad: Tensor) -> None:
        self.grad = grad


class _Group:
    def __init__(self, seq: list, n: int, length: int, norm_dtype: torch.dtype | None):
        self.seq = seq            # params (and _Pad) in layout order
        self.n = n                # layers (rows of the view)
        self.length = length
        self.norm_dtype = norm_dtype


class NormPlan:
    """Layout of one row. ``cols_layer[c]`` = layer of norm column c; column ``width - 1`` is
    the loss. ``max_cols_layer`` likewise for the max |g| rows (packed layers, then large
    tensors' maxima, then their minima)."""

    def __init__(self, params: list[Tensor], slot_layer: list[int], row_dtype: torch.dtype):
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
                seq: list = []
                for size, li, slots in members:
                    for j in slots:
                        seq.append(params[j])
                        self.slot_col[j] = len(cols_layer)
                    if size < length:
                        seq.append(_Pad(torch.zeros(length - size, device=device, dtype=dtype)))
                    cols_layer.append(li)
                norm_dtype = None if dtype == row_dtype else row_dtype
                self.groups.append(_Group(seq, len(members), length, norm_dtype))
        self.big = [params[j] for j in big]
        self.big_cols = (len(cols_layer), len(cols_layer) + len(big))
        for j in big:
            self.slot_col[j] = len(cols_layer)
            cols_layer.append(slot_layer[j])
        self.big_dtype = None if all(params[j].dtype == row_dtype for j in big) else row_dtype
        self.cols_layer = cols_layer
        self.width = len(cols_layer) + 1
        n_packed = self.big_cols[0]
        self.max_cols_layer = cols_layer[:n_packed] + [slot_layer[j] for j in big]
        self.max_width = n_packed + 2 * len(big)
        if len(self.groups) == 1 and not self.big and self.groups[0].norm_dtype is None:
            self.write = self._write_one_group  # the common small-model case, fewer branches

    # -------------------------------------------------------------- row views
    def row_views(self, row: Tensor) -> tuple:
        views = []
        c = 0
        for g in self.groups:
            views.append(row[c:c + g.n])
            c += g.n
        a, b = self.big_cols
        views.append(row[a:b])
        views.append(row[b])
        return tuple(views)

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

    def _write_one_group(self, views: tuple, loss: Tensor) -> list[Tensor]:
        g = self.groups[0]
        flat = _flatten([x.grad for x in g.seq])
        torch.linalg.vector_norm(flat.view(g.n, g.length), dim=1, out=views[0])
        views[2].copy_(loss)
        return [flat]

    def write(self, views: tuple, loss: Tensor) -> list[Tensor] | None:
        """Write the norms and the loss into a row. Returns the packed flat buffers (reused
        for max |g| on sampled steps). Raises on None / unusual gradients (see fallback)."""
        flats = []
        k = 0
        for g in self.groups:
            flat = _flatten([x.grad for x in g.seq])
            flats.append(flat)
            if g.norm_dtype is None:
                torch.linalg.vector_norm(flat.view(g.n, g.length), dim=1, out=views[k])
            else:
                torch.linalg.vector_norm(flat.view(g.n, g.length), dim=1, dtype=g.norm_dtype,
                                         out=views[k])
            k += 1
        if self.big:
            grads = [p.grad for p in self.big]
            if self.big_dtype is None:
                torch.stack(torch._foreach_norm(grads), out=views[k])
            else:
                torch.stack(torch._foreach_norm(grads, 2, dtype=self.big_dtype), out=views[k])
        views[k + 1].copy_(loss)
        return flats

    def write_max(self, views: tuple, flats: list[Tensor] | None) -> None:
        k = 0
        for g in self.groups:
            flat = flats[k] if flats is not None else _flatten([x.grad for x in g.seq])
            torch.amax(flat.view(g.n, g.length).abs(), dim=1, out=views[k])
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

    def write_fallback(self, row: Tensor, loss: Tensor) -> None:
        """Slow but general: per-tensor norms combined into the row's columns."""
        grads = self.fixed_grads()
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64).to(row.device)
                             for g in grads])
        idx = torch.tensor(self.slot_col, device=row.device)
        sq = torch.zeros(self.width - 1, dtype=torch.float64, device=row.device)
        sq.index_add_(0, idx, norms.square())
        row[:-1].copy_(sq.sqrt())
        row[-1].copy_(loss)

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

