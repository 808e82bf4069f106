"""Apply the contract's init names to tensors (in place, under no_grad)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.spec import init_object


def apply_init(tensor: torch.Tensor, init: Any) -> None:
    """Initialise ``tensor`` in place with an init (name or object). ``default`` leaves it alone.

    Uses torch's global RNG (the builder seeds it)."""
    spec = init_object(init)
    name = spec.name
    with torch.no_grad():
        if name == "default":
            return
        if name == "zeros":
            nn.init.zeros_(tensor)
        elif name == "ones":
            nn.init.ones_(tensor)
        elif name == "constant":
            nn.init.constant_(tensor, spec.value)
        elif name == "normal":
            nn.init.normal_(tensor, mean=spec.mean, std=spec.std)
        elif name == "uniform":
            nn.init.uniform_(tensor, a=spec.a, b=spec.b)
        elif name == "xavier_uniform":
            nn.init.xavier_uniform_(tensor, gain=spec.gain)
        elif name == "xavier_normal":
            nn.init.xavier_normal_(tensor, gain=spec.gain)
        elif name == "kaiming_uniform":
            nn.init.kaiming_uniform_(tensor, a=spec.a, mode=spec.mode, nonlinearity=spec.nonlinearity)
        elif name == "kaiming_normal":
            nn.init.kaiming_normal_(tensor, a=spec.a, mode=spec.mode, nonlinearity=spec.nonlinearity)
        elif name == "orthogonal":
            nn.init.orthogonal_(tensor, gain=spec.gain)
        else:  # pragma: no cover - the schema refuses other names
            raise ValueError(f"unknown init {name!r}")


def apply_init_chunks(tensor: torch.Tensor, init: Any, chunks: int) -> None:
    """Initialise each of ``chunks`` row blocks of ``tensor`` separately (one per recurrent gate),
    so e.g. ``orthogonal`` makes every gate's matrix orthogonal and xavier's fan_out is the
    gate's hidden size."""
    if chunks == 1:
        apply_init(tensor, init)
        return
    for block in tensor.data.chunk(chunks, dim=0):
        apply_init(block, init)
