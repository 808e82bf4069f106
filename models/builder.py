"""Job spec -> ``torch.nn.Module``.

```python
built = build_model(spec)          # Built(module, layers, input_shape, output_shape, n_parameters)
built.module(x)                    # x: [B, *input_shape] -> [B, n_outputs]
built.layers                       # [BuiltLayer(name="layers.0.linear", type="linear", pointer="/network/layers/0")]
```

Module names read like the spec (docs/architecture.md, "Builder"):

- top-level layer ``i`` of type ``T``                 -> ``layers.{i}.{T}``
- ``repeat`` at ``layers.{i}``, copy ``k``, inner ``j`` -> ``layers.{i}.{k}.layers.{j}.{T}``
- ``residual`` at ``layers.{i}``, inner ``j``           -> ``layers.{i}.layers.{j}.{T}``
- nesting composes (e.g. ``layers.1.3.layers.0.layers.2.linear``).

``Built.layers`` lists, in forward order, every module with parameters: the weighted layers
(``linear``, ``conv2d``, ``rnn``) and ``batch_norm``, ``layer_norm``, ``prelu``; every copy of a
repeated layer separately, all copies sharing the pointer of the layer's object in the spec.

The build is deterministic: it runs under ``torch.random.fork_rng`` seeded with
``training.seed`` (the caller's global RNG state is left as it was).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from models import spec as S
from models.datasets import dataset_shape
from models.inits import apply_init, apply_init_chunks
from models.validation import ShapeMismatch, SpecError, SpecProblem, layer_output

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuiltLayer:
    name: str  # module name as in model.named_modules(), e.g. "layers.0.linear"
    type: str  # spec type: linear | conv2d | rnn | batch_norm | layer_norm | prelu
    pointer: str  # JSON Pointer of the layer's object in the submitted spec


@dataclass
class Built:
    module: nn.Module
    layers: list[BuiltLayer] = field(default_factory=list)
    input_shape: Shape = ()
    output_shape: Shape = ()
    n_parameters: int = 0


# --------------------------------------------------------------------------------------------
# containers


class Slot(nn.Module):
    """Holds one spec layer as a child named by its type (so names read ``layers.0.linear``)."""

    def __init__(self, type_name: str, module: nn.Module):
        super().__init__()
        self.type_name = type_name
        self.add_module(type_name, module)

    @property
    def inner(self) -> nn.Module:
        return self._modules[self.type_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[self.type_name](x)


class RnnSlot(Slot):
    """An ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (batch_first) and its read-out: ``output="last"`` ->
    the top layer's h at the last step ``[B, H]``; ``"sequence"`` -> every step ``[B, T, H]``."""

    def __init__(self, module: nn.Module, output: str):
        super().__init__("rnn", module)
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self._modules["rnn"](x)
        return out[:, -1] if self.output == "last" else out


class Chain(nn.Module):
    """Runs ``self.layers`` in order (the network itself, and each copy inside a repeat)."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SpecNet(Chain):
    """The model built from a spec: input ``[B, *input_shape]``."""


class RepeatBlock(nn.Sequential):
    """``times`` independent copies (children ``0``, ``1``, ...), each a ``Chain``."""


class ResidualBlock(nn.Module):
    """output = input + f(input), f = ``self.layers``."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.layers:
            y = layer(y)
        return x + y


# --------------------------------------------------------------------------------------------

_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _leaf_module(layer, shape: Shape) -> nn.Module:
    t = layer.type
    if t == "linear":
        m = nn.Linear(shape[-1], layer.out_features, bias=layer.bias)
        apply_init(m.weight, layer.init)
        if m.bias is not None:
            apply_init(m.bias, layer.bias_init)
        return Slot(t, m)
    if t == "conv2d":
        m = nn.Conv2d(shape[0], layer.out_channels, S.as_pair(layer.kernel_size), stride=S.as_pair(layer.stride),
                      padding=S.as_pair(layer.padding), bias=layer.bias)
        apply_init(m.weight, layer.init)
        if m.bias is not None:
            apply_init(m.bias, layer.bias_init)
        return Slot(t, m)
    if t == "rnn":
        kw = dict(input_size=shape[-1], hidden_size=layer.hidden_size, num_layers=layer.num_layers, batch_first=True)
        if layer.cell == "rnn":
            m = nn.RNN(nonlinearity=layer.nonlinearity, **kw)
        elif layer.cell == "lstm":
            m = nn.LSTM(**kw)
        else:
            m = nn.GRU(**kw)
        gates = _GATES[layer.cell]
        for pname, p in m.named_parameters():
            if pname.startswith("weight_ih"):
                apply_init_chunks(p, layer.init, gates)
            elif pname.startswith("weight_hh"):
                apply_init_chunks(p, layer.recurrent_init, gates)
            elif pname.startswith("bias"):
                apply_init(p, layer.bias_init)
        return RnnSlot(m, layer.output)
    if t == "batch_norm":
        return Slot(t, nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0]))
    if t == "layer_norm":
        return Slot(t, nn.LayerNorm(list(shape) if len(shape) == 3 else [shape[-1]]))
    if t == "dropout":
        return Slot(t, nn.Dropout(layer.p))
    if t == "flatten":
        return Slot(t, nn.Flatten())
    if t == "max_pool2d":
        return Slot(t, nn.MaxPool2d(S.as_pair(layer.kernel_size),
                                    stride=S.as_pair(layer.stride) if layer.stride is not None else None))
    if t == "avg_pool2d":
        return Slot(t, nn.AvgPool2d(S.as_pair(layer.kernel_size),
                                    stride=S.as_pair(layer.stride) if layer.stride is not None else None))
    simple = {
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(layer.negative_slope),
        "prelu": lambda: nn.PReLU(),
        "elu": lambda: nn.ELU(layer.alpha),
        "selu": lambda: nn.SELU(),
        "gelu": lambda: nn.GELU(),
        "silu": lambda: nn.SiLU(),
        "tanh": lambda: nn.Tanh(),
        "sigmoid": lambda: nn.Sigmoid(),
        "softplus": lambda: nn.Softplus(beta=layer.beta),
        "identity": lambda: nn.Identity(),
    }
    return Slot(t, simple[t]())


def _build_list(layers: list, shape: Shape, name_prefix: str, ptr_prefix: str, out: list[BuiltLayer]):
    modules: list[nn.Module] = []
    for j, layer in enumerate(layers):
        name = f"{name_prefix}.{j}"
        ptr = f"{ptr_prefix}/{j}"
        t = layer.type
        if t == "repeat":
            copies = []
            for k in range(layer.times):
                mods, shape = _build_list(layer.layers, shape, f"{name}.{k}.layers", ptr + "/layers", out)
                copies.append(Chain(mods))
            modules.append(RepeatBlock(*copies))
        elif t == "residual":
            mods, new_shape = _build_list(layer.layers, shape, f"{name}.layers", ptr + "/layers", out)
            if new_shape != shape:
                raise SpecError([SpecProblem(ptr, f"the residual block changes the shape from {list(shape)} to "
                                                  f"{list(new_shape)}")])
            modules.append(ResidualBlock(mods))
        else:
            try:
                res = layer_output(layer, shape, ptr)
            except ShapeMismatch as e:
                raise SpecError([SpecProblem(e.pointer, e.message)]) from None
            modules.append(_leaf_module(layer, shape))
            if t in S.WEIGHTED_TYPES or t in S.PARAM_NORM_TYPES:
                out.append(BuiltLayer(name=f"{name}.{t}", type=t, pointer=ptr))
            shape = res.shape
    return modules, shape


def build_model(spec: S.JobSpec, input_shape: Sequence[int] | None = None) -> Built:
    """Build the network of a (validated) spec. ``input_shape`` defaults to the dataset's."""
    if input_shape is None:
        input_shape = dataset_shape(spec.data)[0]
    shape = tuple(int(d) for d in input_shape)
    built_layers: list[BuiltLayer] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.training.seed)
        modules, out_shape = _build_list(spec.network.layers, shape, "layers", "/network/layers", built_layers)
        net = SpecNet(modules)
    n_params = sum(p.numel() for p in net.parameters())
    return Built(module=net, layers=built_layers, input_shape=shape, output_shape=tuple(out_shape),
                 n_parameters=n_params)
