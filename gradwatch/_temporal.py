"""Temporal gradient profile of a recurrent module (nn.RNN / nn.LSTM / nn.GRU).

On one sampled batch per epoch the probe replaces the fused kernel's output by an explicit
unroll of the same cell with the module's own weights. The unrolled output equals the fused one
up to float rounding (so training is unchanged), but it exposes the top layer's hidden state h_t
at every time step as a tensor of the graph; a gradient hook on each h_t then records
||dL/dh_t|| (the total derivative: through the output and through h_{t+1}).

Where the unroll cannot stand in for the fused kernel (bidirectional, proj_size, PackedSequence
input), the probe records ||dL/dx_t|| on the module's input sequence instead (wrt "input").
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence


def hidden_supported(mod: nn.RNNBase) -> bool:
    """True when the explicit unroll reproduces the module (so wrt "hidden" is possible)."""
    return (
        mod.mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
        and not mod.bidirectional
        and getattr(mod, "proj_size", 0) == 0
    )


def _split_call(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return x, hx


def unroll(mod: nn.RNNBase, x: Tensor, hx: Any, on_hidden: Callable[[int, Tensor], None]) -> tuple:
    """Recompute `mod(x, hx)` cell by cell. Calls on_hidden(t, h_t) for the top layer's h_t
    (t = 0..T-1, forward time order) so the caller can hook it. Returns the module's output
    structure: (output, h_n) or, for LSTM, (output, (h_n, c_n))."""
    mode = mod.mode
    L, H = mod.num_layers, mod.hidden_size
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(1)  # [T, 1, F]
    elif mod.batch_first:
        x = x.transpose(0, 1)  # [T, B, F]
    T, B = x.shape[0], x.shape[1]
    is_lstm = mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(L, B, H)
        c0 = x.new_zeros(L, B, H) if is_lstm else None
    else:
        if is_lstm:
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        if unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
    layer_in = x
    hn, cn = [], []
    for layer in range(L):
        w_ih = getattr(mod, f"weight_ih_l{layer}")
        w_hh = getattr(mod, f"weight_hh_l{layer}")
        b_ih = getattr(mod, f"bias_ih_l{layer}") if mod.bias else None
        b_hh = getattr(mod, f"bias_hh_l{layer}") if mod.bias else None
        # the input projection for every t in one matmul; for LSTM / RNN both biases go in
        # there too, so each time step is a single addmm plus the cell's elementwise ops
        gi = F.linear(layer_in, w_ih, b_ih)  # [T, B, G]
        if b_hh is not None and mode != "GRU":
            gi = gi + b_hh
        gis = gi.unbind(0)  # not gi[t]: each select's backward would zero-fill all of [T, B, G]
        w_hh_t = w_hh.t()
        h = h0[layer]
        c = c0[layer] if is_lstm else None
        top = layer == L - 1
        outs = []
        for t in range(T):
            if is_lstm:
                gates = torch.addmm(gis[t], h, w_hh_t)
                sig = torch.sigmoid(gates)
                i, f, _, o = sig.chunk(4, 1)
                g = torch.tanh(gates[:, 2 * H:3 * H])
                c = torch.addcmul(f * c, i, g)
                h = o * torch.tanh(c)
            elif mode == "GRU":
                gh = F.linear(h, w_hh, b_hh)
                rz = torch.sigmoid(gis[t][:, :2 * H] + gh[:, :2 * H])
                r, z = rz.chunk(2, 1)
                n = torch.tanh(torch.addcmul(gis[t][:, 2 * H:], r, gh[:, 2 * H:]))
                h = torch.lerp(n, h, z)  # (1 - z) * n + z * h
            elif mode == "RNN_TANH":
                h = torch.tanh(torch.addmm(gis[t], h, w_hh_t))
            else:
                h = torch.relu(torch.addmm(gis[t], h, w_hh_t))
            if top:
                on_hidden(t, h)
            outs.append(h)
        hn.append(h)
        if is_lstm:
            cn.append(c)
        layer_in = torch.stack(outs)
        if not top and mod.dropout > 0 and mod.training:
            layer_in = F.dropout(layer_in, mod.dropout, training=True)
    out = layer_in
    h_n = torch.stack(hn)
    c_n = torch.stack(cn) if is_lstm else None
    if unbatched:
        out = out.squeeze(1)
        h_n = h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    elif mod.batch_first:
        out = out.transpose(0, 1)
    return (out, (h_n, c_n)) if is_lstm else (out, h_n)


def time_norms_of_input_grad(g: Tensor, x: Any, batch_first: bool) -> Tensor:
    """||dL/dx_t|| for every t (batch summed) from the gradient of the input sequence."""
    if isinstance(x, PackedSequence):
        sq = g.float().square().sum(dim=tuple(range(1, g.dim())))
        sizes = [int(s) for s in x.batch_sizes]
        return torch.stack([c.sum() for c in sq.split(sizes)]).sqrt()
    g = g.float()
    if g.dim() == 2:  # unbatched [T, F]
        return torch.linalg.vector_norm(g, dim=1)
    tdim = 1 if batch_first else 0
    dims = tuple(d for d in range(g.dim()) if d != tdim)
    return torch.linalg.vector_norm(g, dim=dims)


__all__ = ["hidden_supported", "unroll", "time_norms_of_input_grad", "_split_call"]
