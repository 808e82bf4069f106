"""Validation of a submitted job spec: schema, shapes through the whole network, limits.

```python
from models.validation import check_spec, Limits, SpecError
spec = check_spec(raw_dict, Limits())      # JobSpec, or raises SpecError
err.problems                               # [SpecProblem(pointer="/network/layers/3/out_features", message="...")]
err.problem_details()                      # an RFC 9457 problem+json body (status 422)
```

Every problem names the deepest JSON Pointer (RFC 6901) into the *submitted* document that is
wrong, and says why in a sentence.  The shape rules (``layer_output``) are shared with the
builder, so what validates is exactly what builds.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from models import spec as S
from models.datasets import DIGITS_N, dataset_shape, n_samples_of
from models.thresholds import DEFAULTS as DEFAULT_THRESHOLDS

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# public types


@dataclass(frozen=True)
class Limits:
    """Refusal limits; the service builds this from its settings."""

    max_parameters: int = 20_000_000
    max_epochs: int = 1000
    max_layers: int = 2000  # leaf layers after expanding `repeat`
    max_depth: int = 32  # nesting of `layers` lists (network.layers is depth 1)
    max_samples: int = 100_000
    max_verify_remedies: int = 3
    #: values per sample in any one layer's output (guards memory, e.g. a huge conv padding)
    max_feature_elements: int = 2_000_000
    #: n_samples x input values (guards the dataset's memory)
    max_data_elements: int = 100_000_000


@dataclass(frozen=True)
class SpecProblem:
    pointer: str  # JSON Pointer into the submitted spec ("" = the whole document)
    message: str

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.message}"


class SpecError(ValueError):
    """The spec cannot be run; ``problems`` says where and why (never empty)."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    def problem_details(self, instance: str | None = None) -> dict:
        """An RFC 9457 problem+json body; ``errors`` lists every problem with its pointer."""
        first = self.problems[0]
        body = {
            "type": "https://gradwatch.dev/problems/invalid-spec",
            "title": "The job spec is not valid",
            "status": 422,
            "detail": str(first) if len(self.problems) == 1 else f"{len(self.problems)} problems; first: {first}",
            "pointer": first.pointer,
            "errors": [{"pointer": p.pointer, "detail": p.message} for p in self.problems],
        }
        if instance:
            body["instance"] = instance
        return body


class ShapeMismatch(Exception):
    def __init__(self, pointer: str, message: str):
        self.pointer, self.message = pointer, message
        super().__init__(f"{pointer}: {message}")


# --------------------------------------------------------------------------------------------
# shape rules (shared with models.builder)


def fmt_shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def describe(shape: Shape) -> str:
    s = fmt_shape(shape)
    if len(shape) == 1:
        return f"{s} (flat)"
    if len(shape) == 2:
        return f"{s} (a sequence [T, F])"
    if len(shape) == 3:
        return f"{s} (an image [C, H, W])"
    return s


def _pool_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


@dataclass
class LayerOut:
    shape: Shape
    params: int
    #: pointer of the field that decided the last dimension (None: unchanged)
    origin: str | None = None


def layer_output(layer: BaseModel, shape: Shape, ptr: str) -> LayerOut:
    """Output shape and parameter count of one leaf layer given its input shape (no batch dim).

    Raises ``ShapeMismatch`` with the pointer of the offending field."""
    t = layer.type
    rank = len(shape)
    if t == "linear":
        if rank == 3:
            raise ShapeMismatch(
                ptr,
                f"linear needs a flat input [F] (or a sequence [T, F]) but gets {describe(shape)}; "
                'put a {"type": "flatten"} before it',
            )
        fin = shape[-1]
        return LayerOut(shape[:-1] + (layer.out_features,), fin * layer.out_features + layer.out_features * layer.bias,
                        ptr + "/out_features")
    if t == "conv2d":
        if rank != 3:
            hint = (
                'use data.shape "image" or put it before the flatten'
                if rank == 1
                else "a sequence cannot be convolved in 2-D; use an rnn or flatten it and use linear"
            )
            raise ShapeMismatch(ptr, f"conv2d needs an input of shape [C, H, W] but gets {describe(shape)}; {hint}")
        c, h, w = shape
        kh, kw = S.as_pair(layer.kernel_size)
        sh, sw = S.as_pair(layer.stride)
        ph, pw = S.as_pair(layer.padding)
        if kh > h + 2 * ph or kw > w + 2 * pw:
            raise ShapeMismatch(
                ptr + "/kernel_size",
                f"the {kh}x{kw} kernel is larger than its input of {h}x{w} (padding {ph}x{pw}, so {h + 2 * ph}x{w + 2 * pw}); "
                "use a smaller kernel_size, more padding, or fewer pooling layers before it",
            )
        oc = layer.out_channels
        out = (oc, _pool_out(h, kh, sh, ph), _pool_out(w, kw, sw, pw))
        return LayerOut(out, c * oc * kh * kw + oc * layer.bias, ptr + "/out_channels")
    if t in ("max_pool2d", "avg_pool2d"):
        if rank != 3:
            raise ShapeMismatch(ptr, f"{t} needs an input of shape [C, H, W] but gets {describe(shape)}")
        c, h, w = shape
        kh, kw = S.as_pair(layer.kernel_size)
        sh, sw = S.as_pair(layer.stride if layer.stride is not None else layer.kernel_size)
        if kh > h or kw > w:
            raise ShapeMismatch(
                ptr + "/kernel_size",
                f"the {kh}x{kw} pooling window is larger than its input of {h}x{w}; use a smaller kernel_size",
            )
        return LayerOut((c, _pool_out(h, kh, sh, 0), _pool_out(w, kw, sw, 0)), 0, None)
    if t == "rnn":
        if rank != 2:
            hint = (
                "the dataset must give sequences (e.g. adding), or keep the rnn before any flatten"
                if rank == 1
                else "flatten the image into a sequence is not supported; use conv2d"
            )
            raise ShapeMismatch(ptr, f"rnn needs a sequence input of shape [T, F] but gets {describe(shape)}; {hint}")
        steps, fin = shape
        hsz = layer.hidden_size
        gates = {"rnn": 1, "lstm": 4, "gru": 3}[layer.cell]
        params = 0
        for k in range(layer.num_layers):
            i = fin if k == 0 else hsz
            params += gates * hsz * (i + hsz) + 2 * gates * hsz
        out = (hsz,) if layer.output == "last" else (steps, hsz)
        return LayerOut(out, params, ptr + "/hidden_size")
    if t == "batch_norm":
        if rank == 2:
            raise ShapeMismatch(
                ptr, f"batch_norm on a sequence {fmt_shape(shape)} is not supported; use layer_norm (normalises each step)"
            )
        return LayerOut(shape, 2 * shape[0], None)
    if t == "layer_norm":
        normalized = shape if rank == 3 else shape[-1:]
        return LayerOut(shape, 2 * math.prod(normalized), None)
    if t == "flatten":
        if rank == 1:
            return LayerOut(shape, 0, None)
        return LayerOut((math.prod(shape),), 0, ptr)
    if t == "prelu":
        return LayerOut(shape, 1, None)
    if t in S.ACTIVATION_TYPES or t == "dropout":
        return LayerOut(shape, 0, None)
    raise ShapeMismatch(ptr + "/type", f"'{t}' is not a leaf layer")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# whole-network inference


@dataclass
class _Walk:
    limits: Limits
    problems: list[SpecProblem] = field(default_factory=list)
    params: int = 0
    biggest: tuple[int, str] = (0, "")

    def add_params(self, n: int, ptr: str) -> None:
        self.params += n
        if n > self.biggest[0]:
            self.biggest = (n, ptr)


def count_leaves(layers: list) -> int:
    """Leaf layers after expanding every ``repeat`` (blocks themselves are not counted)."""
    n = 0
    for layer in layers:
        if layer.type == "repeat":
            n += layer.times * count_leaves(layer.layers)
        elif layer.type == "residual":
            n += count_leaves(layer.layers)
        else:
            n += 1
    return n


def _walk(layers: list, shape: Shape, origin: str | None, prefix: str, w: _Walk, note: str = ""):
    """Returns (shape, origin) after the layers, or None after recording a problem."""
    for j, layer in enumerate(layers):
        ptr = f"{prefix}/{j}"
        t = layer.type
        if t == "repeat":
            k = 0
            while k < layer.times:
                sub_note = note or (f" (in repetition {k + 1} of {layer.times})" if k else "")
                start_params = w.params
                res = _walk(layer.layers, shape, origin, ptr + "/layers", w, sub_note)
                if res is None:
                    if k:
                        w.problems[-1] = SpecProblem(
                            w.problems[-1].pointer,
                            w.problems[-1].message
                            + f"; each copy of the repeated block changes the shape, so copy {k + 1} gets {fmt_shape(shape)}",
                        )
                    return None
                new_shape, new_origin = res
                k += 1
                if new_shape == shape and k < layer.times:
                    # every further copy sees the same shape: same parameters, same result
                    w.add_params((w.params - start_params) * (layer.times - k), ptr)
                    k = layer.times
                shape, origin = new_shape, new_origin
            continue
        if t == "residual":
            res = _walk(layer.layers, shape, origin, ptr + "/layers", w, note)
            if res is None:
                return None
            if res[0] != shape:
                w.problems.append(
                    SpecProblem(
                        ptr,
                        f"the residual block turns {fmt_shape(shape)} into {fmt_shape(res[0])}, but output = input + f(input) "
                        f"needs f to keep the shape; make its layers end with shape {fmt_shape(shape)}{note}",
                    )
                )
                return None
            continue
        try:
            out = layer_output(layer, shape, ptr)
        except ShapeMismatch as e:
            w.problems.append(SpecProblem(e.pointer, e.message + note))
            return None
        n_values = math.prod(out.shape)
        if n_values > w.limits.max_feature_elements:
            w.problems.append(
                SpecProblem(
                    ptr,
                    f"{t} outputs {fmt_shape(out.shape)} = {n_values:,} values per sample; "
                    f"the limit is {w.limits.max_feature_elements:,}{note}",
                )
            )
            return None
        w.add_params(out.params, ptr)
        shape = out.shape
        if out.origin is not None:
            origin = out.origin
    return shape, origin


@dataclass
class Inference:
    input_shape: Shape
    output_shape: Shape | None
    n_parameters: int
    n_layers: int
    problems: list[SpecProblem]


def infer_network(spec: S.JobSpec, limits: Limits = Limits()) -> Inference:
    """Shape inference through the whole network (input shape from the dataset)."""
    input_shape, n_out, task = dataset_shape(spec.data)
    n_layers = count_leaves(spec.network.layers)
    if n_layers > limits.max_layers:
        return Inference(input_shape, None, 0, n_layers, [SpecProblem(
            "/network/layers",
            f"the network has {n_layers:,} layers after expanding repeat; the limit is {limits.max_layers:,}",
        )])
    w = _Walk(limits)
    res = _walk(spec.network.layers, tuple(input_shape), None, "/network/layers", w)
    out_shape = None
    if res is not None:
        out_shape, origin = res
        want = (n_out,)
        if out_shape != want:
            what = f"{n_out} classes" if task == "classification" else f"{n_out} regression output{'s' * (n_out != 1)}"
            ds = f"dataset {spec.data.name} has {what}"
            last = f"/network/layers/{len(spec.network.layers) - 1}"
            if len(out_shape) != 1:
                kind = "a sequence" if len(out_shape) == 2 else "an image"
                fix = 'use output "last" on the rnn, or' if len(out_shape) == 2 else ""
                w.problems.append(SpecProblem(last, (
                    f"the network outputs {kind} {fmt_shape(out_shape)} per sample but {ds}, so it must output [{n_out}]; "
                    f"{fix} add a flatten and a linear layer with out_features {n_out} at the end").replace("  ", " ")))
            elif origin is None:
                w.problems.append(SpecProblem(last, (
                    f"the network outputs {out_shape[0]} values (the size of its input) but {ds}; "
                    f"end with a linear layer with out_features {n_out}")))
            elif origin.endswith("/out_features"):
                w.problems.append(SpecProblem(origin, (
                    f"the last layer outputs {out_shape[0]} values but {ds}; set out_features to {n_out}")))
            else:
                w.problems.append(SpecProblem(origin, (
                    f"the network ends with {out_shape[0]} values from here but {ds}; "
                    f"end with a linear layer with out_features {n_out}")))
    if w.params > limits.max_parameters:
        w.problems.append(SpecProblem("/network", (
            f"the network has {w.params:,} parameters; the limit is {limits.max_parameters:,} "
            f"(the largest layer, {w.biggest[1]}, has {w.biggest[0]:,})")))
    return Inference(tuple(input_shape), out_shape, w.params, n_layers, w.problems)


# --------------------------------------------------------------------------------------------
# other whole-spec rules


def _init_problems(layers: list, prefix: str) -> list[SpecProblem]:
    out: list[SpecProblem] = []
    for j, layer in enumerate(layers):
        ptr = f"{prefix}/{j}"
        if layer.type in S.BLOCK_TYPES:
            out += _init_problems(layer.layers, ptr + "/layers")
            continue
        if layer.type not in S.WEIGHTED_TYPES:
            continue
        fields = ["init", "bias_init"] + (["recurrent_init"] if layer.type == "rnn" else [])
        for f in fields:
            init = getattr(layer, f)
            name = S.init_name(init)
            if isinstance(init, str) and name == "constant":
                out.append(SpecProblem(f"{ptr}/{f}", (
                    'the constant init needs a value; write it as {"name": "constant", "value": 0.1}')))
            if f == "bias_init" and name in S.MATRIX_INITS:
                out.append(SpecProblem(f"{ptr}/{f}", (
                    f"{name} needs a weight matrix but a bias is a vector; use zeros, ones, constant, normal or uniform")))
            if f == "bias_init" and getattr(layer, "bias", True) is False and "bias_init" in layer.model_fields_set \
                    and name != "default":
                out.append(SpecProblem(f"{ptr}/{f}", "bias_init is given but the layer has bias false; remove one of them"))
    return out


def semantic_problems(spec: S.JobSpec, limits: Limits = Limits()) -> tuple[list[SpecProblem], Inference | None]:
    """Everything pydantic cannot see alone. Returns (problems, inference)."""
    problems: list[SpecProblem] = []
    data = spec.data
    input_shape, n_out, task = dataset_shape(data)

    if spec.network.input_shape is not None and tuple(spec.network.input_shape) != tuple(input_shape):
        extra = f' with shape "{data.shape}"' if isinstance(data, S.DigitsData) else ""
        problems.append(SpecProblem("/network/input_shape", (
            f"network.input_shape is {fmt_shape(spec.network.input_shape)} but dataset {data.name}{extra} "
            f"gives inputs of shape {fmt_shape(input_shape)}; remove it or make it agree")))

    n = n_samples_of(data)
    if isinstance(data, S.DigitsData) and n > DIGITS_N:
        problems.append(SpecProblem("/data/n_samples", f"digits has only {DIGITS_N:,} samples, n_samples is {n:,}"))
    elif n > limits.max_samples:
        problems.append(SpecProblem("/data/n_samples", f"n_samples is {n:,}; the limit is {limits.max_samples:,}"))
    elif n * math.prod(input_shape) > limits.max_data_elements:
        problems.append(SpecProblem("/data/n_samples", (
            f"the dataset would hold {n:,} x {fmt_shape(input_shape)} = {n * math.prod(input_shape):,} values; "
            f"the limit is {limits.max_data_elements:,}; use fewer samples or smaller inputs")))

    if spec.training.epochs > limits.max_epochs:
        problems.append(SpecProblem("/training/epochs",
                                    f"epochs is {spec.training.epochs:,}; the limit is {limits.max_epochs:,}"))
    if spec.analysis.verify_remedies > limits.max_verify_remedies:
        problems.append(SpecProblem("/analysis/verify_remedies", (
            f"verify_remedies is {spec.analysis.verify_remedies}; at most {limits.max_verify_remedies} remedies "
            "can be verified")))
    for name in sorted(set(spec.analysis.thresholds or ()) - set(DEFAULT_THRESHOLDS)):
        close = difflib.get_close_matches(name, list(DEFAULT_THRESHOLDS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        problems.append(SpecProblem(f"/analysis/thresholds/{_escape(name)}", (
            f"unknown threshold {name!r}; {hint}known: {', '.join(sorted(DEFAULT_THRESHOLDS))}")))

    loss = spec.training.loss
    if loss != "auto":
        ok = S.CLASSIFICATION_LOSSES if task == "classification" else S.REGRESSION_LOSSES
        if loss not in ok:
            problems.append(SpecProblem("/training/loss", (
                f"loss {loss} is for {'regression' if task == 'classification' else 'classification'} but dataset "
                f"{data.name} is a {task} task; use \"auto\" or one of: {', '.join(sorted(ok))}")))

    problems += _init_problems(spec.network.layers, "/network/layers")
    inference = infer_network(spec, limits)
    problems += inference.problems
    return problems, inference


# --------------------------------------------------------------------------------------------
# pydantic errors -> pointers and sentences


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def pointer_of(loc: tuple, raw: Any, keep_last: bool = False) -> tuple[str, list[Any]]:
    """JSON Pointer of a pydantic ``loc`` in the submitted document.

    pydantic inserts union tags (``'linear'``, ``'str'``, ``'obj'``, ...) into ``loc``; they are
    recognised because they are not a key of the document at that point, and dropped. With
    ``keep_last`` the last entry is kept even so (a missing field is not in the document)."""
    parts: list[Any] = []
    node = raw
    for i, key in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and isinstance(key, str) and key in node:
            parts.append(key)
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            parts.append(key)
            node = node[key]
        elif last and keep_last and isinstance(node, dict) and isinstance(key, str):
            parts.append(key)
            node = None
        # else: a tag pydantic inserted
    return "".join("/" + _escape(str(p)) for p in parts), parts


def _node_at(raw: Any, parts: list[Any]) -> Any:
    node = raw
    for p in parts:
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _suggest(word: Any, options: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_LAYER_MODELS: dict[str, type[BaseModel]] = {
    "linear": S.Linear, "conv2d": S.Conv2d, "rnn": S.Rnn, "batch_norm": S.BatchNorm, "layer_norm": S.LayerNorm,
    "dropout": S.Dropout, "flatten": S.Flatten, "max_pool2d": S.MaxPool2d, "avg_pool2d": S.AvgPool2d,
    "relu": S.ReLU, "leaky_relu": S.LeakyReLU, "prelu": S.PReLU, "elu": S.ELU, "selu": S.SELU, "gelu": S.GELU,
    "silu": S.SiLU, "tanh": S.Tanh, "sigmoid": S.Sigmoid, "softplus": S.Softplus, "identity": S.Identity,
    "repeat": S.Repeat, "residual": S.Residual,
}  # fmt: skip
_DATA_MODELS: dict[str, type[BaseModel]] = {
    "digits": S.DigitsData, "spirals": S.SpiralsData, "blobs": S.BlobsData, "teacher": S.TeacherData,
    "adding": S.AddingData,
}  # fmt: skip
_SECTION_MODELS: dict[tuple, type[BaseModel]] = {
    (): S.JobSpec, ("network",): S.Network, ("training",): S.Training, ("analysis",): S.Analysis,
    ("training", "optimizer"): S.OptimizerSpec, ("training", "grad_clip"): S.GradClip,
}  # fmt: skip


def _model_for(parts: list[Any], parent: Any) -> type[BaseModel] | None:
    """The schema model of the object at ``parts`` (for listing its allowed fields)."""
    if tuple(parts) in _SECTION_MODELS:
        return _SECTION_MODELS[tuple(parts)]
    if not isinstance(parent, dict):
        return None
    if tuple(parts) == ("data",):
        return _DATA_MODELS.get(parent.get("name"))
    if parts and parts[-1] in ("init", "bias_init", "recurrent_init"):
        return S._INIT_MODELS.get(parent.get("name"))
    if len(parts) >= 2 and parts[-2] == "layers" and isinstance(parts[-1], int):
        return _LAYER_MODELS.get(parent.get("type"))
    return None


def _what(parts: list[Any], parent: Any) -> str:
    """A short name for the object at ``parts``: 'linear layer', 'training', ..."""
    if isinstance(parent, dict):
        if isinstance(parent.get("type"), str) and parts and isinstance(parts[-1], int):
            return f"a {parent['type']} layer"
        if isinstance(parent.get("name"), str) and parts and parts[-1] in ("init", "bias_init", "recurrent_init"):
            return f"the {parent['name']} init"
        if isinstance(parent.get("name"), str) and tuple(parts) == ("data",):
            return f"dataset {parent['name']}"
    if not parts:
        return "the job spec"
    return str(parts[-1])


def _fmt_value(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    r = repr(v)
    return r if len(r) < 60 else r[:57] + "..."


def _expected(ctx_value: str) -> list[str]:
    return [s.strip().strip("'") for s in ctx_value.replace(" or ", ", ").split(",") if s.strip()]


_UNION_NOUNS = {"type": ("layer type", "known types"), "name": ("name", "known names")}


def _union_context(parts: list[Any]) -> tuple[str, str]:
    if tuple(parts) == ("data",):
        return "dataset", "built-in datasets"
    if parts and parts[-1] in ("init", "bias_init", "recurrent_init"):
        return "init", "known inits"
    if tuple(parts) == ("training", "optimizer"):
        return "optimizer", "known optimizers"
    if len(parts) >= 2 and parts[-2] == "layers":
        return "layer type", "known types"
    return "name", "known names"


def _problem_from_error(err: dict, raw: Any) -> SpecProblem:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    pointer, parts = pointer_of(tuple(err["loc"]), raw, keep_last=etype == "missing")
    if etype == "spec_field":
        parts = parts + [ctx["field"]]
        pointer = f"{pointer}/{_escape(ctx['field'])}"
    name = str(parts[-1]) if parts and isinstance(parts[-1], str) else (
        f"{parts[-2]}[{parts[-1]}]" if len(parts) >= 2 else "value")
    parent_parts = parts[:-1]
    parent = _node_at(raw, parent_parts)

    if etype in ("union_tag_invalid", "union_tag_not_found"):
        disc = ctx.get("discriminator", "'type'").strip("'")
        noun, known = _union_context(parts)
        options = _expected(ctx.get("expected_tags", "")) or {
            "layer type": list(S.LAYER_TYPES), "dataset": list(S.DATASET_NAMES), "init": list(S.INIT_NAMES),
        }.get(noun, [])
        ptr = f"{pointer}/{disc}"
        if etype == "union_tag_not_found":
            return SpecProblem(ptr, f"{disc} is required here; {known}: {', '.join(options)}")
        tag = ctx.get("tag")
        return SpecProblem(ptr, f"unknown {noun} '{tag}'{_suggest(tag, options)}; {known}: {', '.join(options)}")

    if etype == "literal_error":
        options = _expected(ctx.get("expected", ""))
        if parts and parts[-1] in ("init", "bias_init", "recurrent_init"):
            return SpecProblem(pointer, f"unknown init {_fmt_value(value)}{_suggest(value, options)}; known inits: "
                                        f"{', '.join(options)}")
        if tuple(parts) == ("training", "optimizer"):
            return SpecProblem(pointer, f"unknown optimizer {_fmt_value(value)}{_suggest(value, options)}; known "
                                        f"optimizers: {', '.join(options)}")
        return SpecProblem(pointer, f"{name} is {_fmt_value(value)}{_suggest(value, options)}; it must be one of: "
                                    f"{', '.join(options)}")

    if etype == "missing":
        owner = _what(parent_parts, parent)
        return SpecProblem(pointer, f"{owner} needs '{name}'" if owner != name else f"'{name}' is required")

    if etype == "extra_forbidden":
        model = _model_for(parent_parts, parent)
        allowed = sorted(model.model_fields, key=lambda f: f not in ("type", "name")) if model else []
        owner = _what(parent_parts, parent)
        msg = f"unknown field '{name}' in {owner}{_suggest(name, allowed)}"
        if allowed:
            msg += f"; allowed fields: {', '.join(allowed)}"
        return SpecProblem(pointer, msg)

    if etype == "finite_number":
        return SpecProblem(pointer, f"{name} must be a finite number, not {_fmt_value(value)}")
    if etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op, bound = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
                     "less_than_equal": ("<=", "le")}[etype]
        return SpecProblem(pointer, f"{name} must be {op} {ctx.get(bound)}, got {_fmt_value(value)}")
    if etype in ("int_type", "int_parsing", "int_from_float"):
        return SpecProblem(pointer, f"{name} must be a whole number, got {_fmt_value(value)}")
    if etype in ("float_type", "float_parsing"):
        return SpecProblem(pointer, f"{name} must be a number, got {_fmt_value(value)}")
    if etype == "bool_type":
        return SpecProblem(pointer, f"{name} must be true or false, got {_fmt_value(value)}")
    if etype == "string_type":
        return SpecProblem(pointer, f"{name} must be a string, got {_fmt_value(value)}")
    if etype in ("string_too_short", "string_too_long"):
        return SpecProblem(pointer, f"{name} must have {ctx.get('min_length', ctx.get('max_length'))} "
                                    f"{'or more' if etype == 'string_too_short' else 'or fewer'} characters")
    if etype in ("too_short", "too_long"):
        n = ctx.get("min_length") if etype == "too_short" else ctx.get("max_length")
        if name == "layers" and etype == "too_short":
            return SpecProblem(pointer, "layers must hold at least one layer")
        return SpecProblem(pointer, f"{name} must have {'at least' if etype == 'too_short' else 'at most'} {n} "
                                    f"item{'s' * (n != 1)}, got {ctx.get('actual_length')}")
    if etype in ("list_type", "tuple_type"):
        return SpecProblem(pointer, f"{name} must be a list, got {_fmt_value(value)}")
    if etype in ("model_type", "model_attributes_type", "dict_type"):
        if len(parts) >= 2 and parts[-2] == "layers":
            return SpecProblem(pointer, f"each layer must be an object such as {{\"type\": \"relu\"}}, got "
                                        f"{_fmt_value(value)}")
        if name in ("init", "bias_init", "recurrent_init", "optimizer"):
            example = "'kaiming_normal'" if name != "optimizer" else "'adam'"
            return SpecProblem(pointer, f"{name} must be a name such as {example} or an object with a name, got "
                                        f"{_fmt_value(value)}")
        return SpecProblem(pointer, f"{name} must be an object, got {_fmt_value(value)}")
    if etype == "spec_field":
        return SpecProblem(pointer, err.get("msg", ""))
    if etype == "value_error":
        msg = err.get("msg", "")
        msg = msg.split("Value error, ", 1)[-1]
        return SpecProblem(pointer, msg)
    return SpecProblem(pointer, f"{name}: {err.get('msg', 'is not valid')}")


def _depth_problem(raw: dict, max_depth: int) -> SpecProblem | None:
    """Nesting depth of `layers` lists, checked on the raw document (before pydantic recurses)."""
    net = raw.get("network")
    if not isinstance(net, dict) or not isinstance(net.get("layers"), list):
        return None
    stack = [(net["layers"], 1, "/network/layers")]
    while stack:
        layers, depth, ptr = stack.pop()
        if depth > max_depth:
            return SpecProblem(ptr, f"blocks are nested {depth} deep here; the limit is {max_depth}")
        for j, layer in enumerate(layers):
            if isinstance(layer, dict) and isinstance(layer.get("layers"), list):
                stack.append((layer["layers"], depth + 1, f"{ptr}/{j}/layers"))
    return None


# --------------------------------------------------------------------------------------------


def check_spec(raw: Any, limits: Limits = Limits()) -> S.JobSpec:
    """Validate a submitted spec completely; returns the JobSpec or raises ``SpecError``."""
    if not isinstance(raw, dict):
        raise SpecError([SpecProblem("", f"the job spec must be a JSON object, got {type(raw).__name__}")])
    deep = _depth_problem(raw, limits.max_depth)
    if deep is not None:
        raise SpecError([deep])
    try:
        spec = S.JobSpec.model_validate(raw)
    except ValidationError as e:
        problems: list[SpecProblem] = []
        for err in e.errors(include_url=False):
            p = _problem_from_error(err, raw)
            if p not in problems:
                problems.append(p)
        raise SpecError(problems) from None
    problems, _ = semantic_problems(spec, limits)
    if problems:
        raise SpecError(problems)
    return spec


def spec_problems(raw: Any, limits: Limits = Limits()) -> list[SpecProblem]:
    """Like ``check_spec`` but returns the problems (empty = valid)."""
    try:
        check_spec(raw, limits)
    except SpecError as e:
        return e.problems
    return []
