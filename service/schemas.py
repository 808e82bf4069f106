"""Request bodies the API validates itself (spec bodies are validated by models.validation)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

Name = Annotated[str, Field(min_length=1, max_length=200)]


class LayerDecl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    type: Annotated[str, Field(min_length=1, max_length=64)]


class ExternalJobIn(BaseModel):
    """`{"source": "external", "name", "layers": [{"name", "type"}], "epochs"?}`."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["external"]
    name: Name
    layers: Annotated[list[LayerDecl], Field(min_length=1, max_length=2000)]
    epochs: Annotated[int, Field(ge=1, le=100_000)] | None = None
    callback_url: AnyHttpUrl | None = None


class GradNormIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    last: float | None = None


class ActivationIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    mean: float | None = None
    std: float | None = None
    saturated_frac: float | None = None
    dead_frac: float | None = None


class LayerStatsIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Name
    type: Annotated[str, Field(min_length=1, max_length=64)]
    grad_norm: GradNormIn
    grad_max_abs: float | None = None
    weight_norm: float | None = None
    update_ratio: float | None = None
    nonfinite_grads: Annotated[int, Field(ge=0)] = 0
    activation: ActivationIn | None = None


class TemporalIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    layer: Name
    wrt: Literal["hidden", "input"]
    grad_norm_by_step: Annotated[list[float | None], Field(max_length=100_000)]


class EpochRecordIn(BaseModel):
    """One epoch record of the contract. Extra fields are kept: newer SDKs may send more."""

    model_config = ConfigDict(extra="allow")
    epoch: Annotated[int, Field(ge=1, le=1_000_000)]
    loss: float | None = None
    metrics: dict[str, float | None] = Field(default_factory=dict)
    nonfinite: bool = False
    layers: Annotated[list[LayerStatsIn], Field(max_length=2000)] = Field(default_factory=list)
    temporal: TemporalIn | None = None

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > 100:
            raise ValueError("at most 100 metrics per epoch")
        return value
