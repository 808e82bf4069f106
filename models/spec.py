"""Pydantic v2 schema of a gradwatch job spec (docs/API.md, "Job spec").

Every model refuses unknown fields (``extra="forbid"``: a typo is a 422, never a silently
ignored option), refuses NaN/Inf (``allow_inf_nan=False``) and is strict about types (``true``
is not a number, ``"0.1"`` is not a float; an integral float such as ``10.0`` is accepted where
a whole number is expected).  Field names and defaults follow the contract; where the contract
names no default the one chosen here is written next to the field.

``JobSpec.model_dump(mode="json", exclude_unset=True)`` gives back the submitted spec.

Only *local* rules live here (ranges, one-of fields, options that belong to another variant).
Rules that need the whole spec — shape inference through the network, the dataset's output
size, the loss for the task, the configurable limits — are in ``models.validation``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

# --------------------------------------------------------------------------------------------
# basics


def _integral_float_to_int(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


#: a whole number; ``10.0`` is accepted as 10, ``true`` and ``"10"`` are not
Int = Annotated[int, BeforeValidator(_integral_float_to_int)]
PosInt = Annotated[Int, Field(ge=1)]
Seed = Annotated[Int, Field(ge=0, le=2**32 - 1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def _str_or_object(v: Any) -> str:
    return "str" if isinstance(v, str) else "obj"


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error raised by a model validator about one of the model's fields; the validation
    module turns it into the pointer of that field (``ctx["field"]``)."""
    return PydanticCustomError("spec_field", message.replace("{", "(").replace("}", ")"), {"field": field})


# --------------------------------------------------------------------------------------------
# initialisers

InitName = Literal[
    "default",
    "zeros",
    "ones",
    "constant",
    "normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
]
INIT_NAMES: tuple[str, ...] = InitName.__args__  # type: ignore[attr-defined]
#: inits that need a weight matrix (at least 2-D) and so cannot initialise a bias vector
MATRIX_INITS = frozenset({"xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal"})
KaimingNonlinearity = Literal["relu", "leaky_relu", "linear", "sigmoid", "tanh", "selu"]


class DefaultInit(StrictModel):
    """PyTorch's own initialisation of the layer (nothing is changed)."""

    name: Literal["default"]


class ZerosInit(StrictModel):
    name: Literal["zeros"]


class OnesInit(StrictModel):
    name: Literal["ones"]


class ConstantInit(StrictModel):
    name: Literal["constant"]
    value: float


class NormalInit(StrictModel):
    """N(mean, std²). ``std`` defaults to 1.0 (as ``torch.nn.init.normal_``)."""

    name: Literal["normal"]
    mean: float = 0.0
    std: float = Field(1.0, ge=0.0)


class UniformInit(StrictModel):
    """U(a, b). Defaults a=0, b=1 (as ``torch.nn.init.uniform_``); needs a <= b."""

    name: Literal["uniform"]
    a: float = 0.0
    b: float = 1.0

    @model_validator(mode="after")
    def _order(self) -> "UniformInit":
        if self.a > self.b:
            raise field_error("b", f"uniform init needs a <= b, got a={self.a} and b={self.b}")
        return self


class XavierUniformInit(StrictModel):
    name: Literal["xavier_uniform"]
    gain: float = Field(1.0, gt=0.0)


class XavierNormalInit(StrictModel):
    name: Literal["xavier_normal"]
    gain: float = Field(1.0, gt=0.0)


class KaimingUniformInit(StrictModel):
    name: Literal["kaiming_uniform"]
    nonlinearity: KaimingNonlinearity = "relu"
    a: float = Field(0.0, ge=0.0)
    mode: Literal["fan_in", "fan_out"] = "fan_in"


class KaimingNormalInit(StrictModel):
    name: Literal["kaiming_normal"]
    nonlinearity: KaimingNonlinearity = "relu"
    a: float = Field(0.0, ge=0.0)
    mode: Literal["fan_in", "fan_out"] = "fan_in"


class OrthogonalInit(StrictModel):
    name: Literal["orthogonal"]
    gain: float = Field(1.0, gt=0.0)


InitObject = Annotated[
    Union[
        DefaultInit,
        ZerosInit,
        OnesInit,
        ConstantInit,
        NormalInit,
        UniformInit,
        XavierUniformInit,
        XavierNormalInit,
        KaimingUniformInit,
        KaimingNormalInit,
        OrthogonalInit,
    ],
    Field(discriminator="name"),
]

#: ``"xavier_uniform"`` or ``{"name": "xavier_uniform", "gain": 2}``
Init = Annotated[
    Union[Annotated[InitName, Tag("str")], Annotated[InitObject, Tag("obj")]],
    Discriminator(_str_or_object),
]

_INIT_MODELS = {
    "default": DefaultInit,
    "zeros": ZerosInit,
    "ones": OnesInit,
    "constant": ConstantInit,
    "normal": NormalInit,
    "uniform": UniformInit,
    "xavier_uniform": XavierUniformInit,
    "xavier_normal": XavierNormalInit,
    "kaiming_uniform": KaimingUniformInit,
    "kaiming_normal": KaimingNormalInit,
    "orthogonal": OrthogonalInit,
}


def init_object(init: Any) -> BaseModel:
    """Normalise an init (name or object) to its object form with every default filled in.

    ``init_object("constant")`` raises ``ValueError`` (constant needs a value)."""
    if isinstance(init, BaseModel):
        return init
    if isinstance(init, str):
        return _INIT_MODELS[init].model_validate({"name": init})
    return _INIT_MODELS[init["name"]].model_validate(init)


def init_name(init: Any) -> str:
    return init if isinstance(init, str) else init.name


# --------------------------------------------------------------------------------------------
# layers

Pair = Annotated[list[PosInt], Field(min_length=2, max_length=2)]
NonNegPair = Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=2, max_length=2)]
KernelSize = Union[PosInt, Pair]


def as_pair(v: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


class _Weighted(StrictModel):
    init: Init = "default"
    bias_init: Init = "default"


class Linear(_Weighted):
    type: Literal["linear"]
    out_features: PosInt
    bias: bool = True


class Conv2d(_Weighted):
    type: Literal["conv2d"]
    out_channels: PosInt
    kernel_size: KernelSize
    stride: KernelSize = 1
    padding: Union[Annotated[Int, Field(ge=0)], NonNegPair] = 0
    bias: bool = True


class Rnn(_Weighted):
    """A recurrent layer (batch_first). ``cell`` defaults to ``"rnn"`` (the contract names none).

    ``init`` initialises the input-to-hidden weights, ``recurrent_init`` the hidden-to-hidden
    ones, ``bias_init`` every bias; for lstm/gru each gate's block is initialised on its own."""

    type: Literal["rnn"]
    cell: Literal["rnn", "lstm", "gru"] = "rnn"
    hidden_size: PosInt
    num_layers: Annotated[Int, Field(ge=1, le=64)] = 1
    nonlinearity: Literal["tanh", "relu"] = "tanh"
    output: Literal["last", "sequence"] = "last"
    recurrent_init: Init = "default"

    @model_validator(mode="after")
    def _nonlinearity_only_for_rnn(self) -> "Rnn":
        if "nonlinearity" in self.model_fields_set and self.cell != "rnn":
            raise field_error(
                "nonlinearity", f"nonlinearity only applies to cell 'rnn'; a {self.cell} cell has fixed gates, remove it"
            )
        return self


class BatchNorm(StrictModel):
    type: Literal["batch_norm"]


class LayerNorm(StrictModel):
    type: Literal["layer_norm"]


class Dropout(StrictModel):
    """Dropout with probability ``p`` in [0, 1); default 0.5 (PyTorch's)."""

    type: Literal["dropout"]
    p: float = Field(0.5, ge=0.0, lt=1.0)


class Flatten(StrictModel):
    """Flattens every dimension but the batch one."""

    type: Literal["flatten"]


class MaxPool2d(StrictModel):
    """``stride`` defaults to ``kernel_size`` (PyTorch's rule)."""

    type: Literal["max_pool2d"]
    kernel_size: KernelSize
    stride: KernelSize | None = None


class AvgPool2d(StrictModel):
    """``stride`` defaults to ``kernel_size`` (PyTorch's rule)."""

    type: Literal["avg_pool2d"]
    kernel_size: KernelSize
    stride: KernelSize | None = None


class ReLU(StrictModel):
    type: Literal["relu"]


class LeakyReLU(StrictModel):
    type: Literal["leaky_relu"]
    negative_slope: float = Field(0.01, ge=0.0)


class PReLU(StrictModel):
    """One learnable slope (PyTorch's default, initialised to 0.25)."""

    type: Literal["prelu"]


class ELU(StrictModel):
    type: Literal["elu"]
    alpha: float = Field(1.0, gt=0.0)


class SELU(StrictModel):
    type: Literal["selu"]


class GELU(StrictModel):
    type: Literal["gelu"]


class SiLU(StrictModel):
    type: Literal["silu"]


class Tanh(StrictModel):
    type: Literal["tanh"]


class Sigmoid(StrictModel):
    type: Literal["sigmoid"]


class Softplus(StrictModel):
    type: Literal["softplus"]
    beta: float = Field(1.0, gt=0.0)


class Identity(StrictModel):
    type: Literal["identity"]


class Repeat(StrictModel):
    """``times`` independent copies of ``layers`` in a row (each copy freshly initialised)."""

    type: Literal["repeat"]
    times: Annotated[Int, Field(ge=1, le=1_000_000)]
    layers: list["Layer"] = Field(min_length=1)


class Residual(StrictModel):
    """output = input + f(input), f = ``layers``; f must keep the shape."""

    type: Literal["residual"]
    layers: list["Layer"] = Field(min_length=1)


Layer = Annotated[
    Union[
        Linear,
        Conv2d,
        Rnn,
        BatchNorm,
        LayerNorm,
        Dropout,
        Flatten,
        MaxPool2d,
        AvgPool2d,
        ReLU,
        LeakyReLU,
        PReLU,
        ELU,
        SELU,
        GELU,
        SiLU,
        Tanh,
        Sigmoid,
        Softplus,
        Identity,
        Repeat,
        Residual,
    ],
    Field(discriminator="type"),
]

LAYER_TYPES: tuple[str, ...] = (
    "linear", "conv2d", "rnn",
    "batch_norm", "layer_norm", "dropout",
    "flatten", "max_pool2d", "avg_pool2d",
    "relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "tanh", "sigmoid", "softplus", "identity",
    "repeat", "residual",
)  # fmt: skip
WEIGHTED_TYPES = frozenset({"linear", "conv2d", "rnn"})
PARAM_NORM_TYPES = frozenset({"batch_norm", "layer_norm", "prelu"})
ACTIVATION_TYPES = frozenset(
    {"relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "tanh", "sigmoid", "softplus", "identity"}
)
BLOCK_TYPES = frozenset({"repeat", "residual"})

Repeat.model_rebuild()
Residual.model_rebuild()


class Network(StrictModel):
    layers: list[Layer] = Field(min_length=1)
    #: optional; must then agree with the dataset's input shape (without the batch dimension)
    input_shape: list[PosInt] | None = None


# --------------------------------------------------------------------------------------------
# datasets

NSamples = Annotated[Int, Field(ge=1)]


class DigitsData(StrictModel):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), pixels scaled to [0, 1].

    ``shape``: ``"flat"`` -> input [64] (default), ``"image"`` -> [1, 8, 8].
    ``n_samples``: default all 1,797; fewer takes a seeded random subset."""

    name: Literal["digits"]
    shape: Literal["flat", "image"] = "flat"
    n_samples: NSamples | None = None
    seed: Seed = 0


class SpiralsData(StrictModel):
    """``classes`` interleaved 2-D spiral arms, Gaussian ``noise`` on the coordinates."""

    name: Literal["spirals"]
    classes: Annotated[Int, Field(ge=2, le=100)] = 2
    noise: float = Field(0.1, ge=0.0, le=10.0)
    n_samples: NSamples = 1000
    seed: Seed = 0


class BlobsData(StrictModel):
    """Isotropic Gaussian blobs (scikit-learn's make_blobs), inputs standardised."""

    name: Literal["blobs"]
    features: Annotated[Int, Field(ge=1, le=10_000)] = 2
    classes: Annotated[Int, Field(ge=2, le=1000)] = 3
    n_samples: NSamples = 1000
    seed: Seed = 0


class TeacherData(StrictModel):
    """Regression on the outputs of a random teacher MLP; targets have unit-ish variance."""

    name: Literal["teacher"]
    features: Annotated[Int, Field(ge=1, le=10_000)] = 10
    outputs: Annotated[Int, Field(ge=1, le=1000)] = 1
    #: std of Gaussian noise added to the (unit-variance) targets; an extension, default 0
    noise: float = Field(0.0, ge=0.0, le=10.0)
    n_samples: NSamples = 1000
    seed: Seed = 0


class AddingData(StrictModel):
    """The adding problem: [seq_len, 2] sequences of (value, marker), target = sum of the two marked values."""

    name: Literal["adding"]
    seq_len: Annotated[Int, Field(ge=2, le=10_000)] = 20
    n_samples: NSamples = 1000
    seed: Seed = 0


DataSpec = Annotated[
    Union[DigitsData, SpiralsData, BlobsData, TeacherData, AddingData],
    Field(discriminator="name"),
]
DATASET_NAMES: tuple[str, ...] = ("digits", "spirals", "blobs", "teacher", "adding")


# --------------------------------------------------------------------------------------------
# training

OptimizerName = Literal["sgd", "adam", "adamw", "rmsprop"]
OPTIMIZER_NAMES: tuple[str, ...] = OptimizerName.__args__  # type: ignore[attr-defined]


class OptimizerSpec(StrictModel):
    """Options left out (None) take PyTorch's defaults for that optimizer: ``momentum`` (sgd,
    rmsprop) 0; ``betas`` (adam, adamw) (0.9, 0.999); ``weight_decay`` 0, but 0.01 for adamw."""

    name: OptimizerName
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    weight_decay: float | None = Field(None, ge=0.0, le=1e3)
    betas: Annotated[list[Annotated[float, Field(ge=0.0, lt=1.0)]], Field(min_length=2, max_length=2)] | None = None

    @model_validator(mode="after")
    def _options_fit_optimizer(self) -> "OptimizerSpec":
        if self.momentum is not None and self.name in ("adam", "adamw"):
            raise field_error("momentum", f"{self.name} has no momentum option; its momentum is set by betas")
        if self.betas is not None and self.name in ("sgd", "rmsprop"):
            raise field_error("betas", f"{self.name} has no betas option; use momentum")
        return self


Optimizer = Annotated[
    Union[Annotated[OptimizerName, Tag("str")], Annotated[OptimizerSpec, Tag("obj")]],
    Discriminator(_str_or_object),
]


class GradClip(StrictModel):
    """Exactly one of ``max_norm`` (clip the global gradient norm) or ``max_value`` (clamp each element)."""

    max_norm: float | None = Field(None, gt=0.0)
    max_value: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _exactly_one(self) -> "GradClip":
        if (self.max_norm is None) == (self.max_value is None):
            raise ValueError('grad_clip needs exactly one of "max_norm" or "max_value"')
        return self


LossName = Literal["auto", "cross_entropy", "mse", "l1", "smooth_l1", "huber"]
LOSS_NAMES: tuple[str, ...] = LossName.__args__  # type: ignore[attr-defined]
CLASSIFICATION_LOSSES = frozenset({"cross_entropy"})
REGRESSION_LOSSES = frozenset({"mse", "l1", "smooth_l1", "huber"})


class Training(StrictModel):
    """Defaults (the contract names none): sgd, lr 0.01, batch_size 32, epochs 10, no clipping,
    loss auto, seed 0, device auto."""

    optimizer: Optimizer = "sgd"
    lr: float = Field(0.01, gt=0.0, le=1e6)
    batch_size: Annotated[Int, Field(ge=1, le=1_000_000)] = 32
    epochs: Annotated[Int, Field(ge=1)] = 10
    grad_clip: GradClip | None = None
    loss: LossName = "auto"
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def optimizer_spec(self) -> OptimizerSpec:
        """The optimizer in object form (a bare name becomes ``{"name": name}``)."""
        if isinstance(self.optimizer, str):
            return OptimizerSpec(name=self.optimizer)
        return self.optimizer


class Analysis(StrictModel):
    """``early_stop`` defaults to true, ``verify_remedies`` to 0 (at most the configured limit, 3)."""

    early_stop: bool = True
    verify_remedies: Annotated[Int, Field(ge=0)] = 0
    #: overrides of the diagnosis engine's thresholds (names are the engine's; finite numbers)
    thresholds: dict[Annotated[str, Field(min_length=1, max_length=100)], float] | None = None


class JobSpec(StrictModel):
    source: Literal["spec"] = "spec"
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    network: Network
    data: DataSpec
    training: Training = Field(default_factory=Training)
    analysis: Analysis = Field(default_factory=Analysis)

    def raw(self) -> dict:
        """The spec as submitted (unset defaults left out)."""
        return self.model_dump(mode="json", exclude_unset=True)
