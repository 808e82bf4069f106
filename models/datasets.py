"""Built-in datasets, made offline and deterministically from ``data.seed``.

Every generator draws from ``numpy.random.default_rng(seed)`` only, so the same spec gives the
same tensors on every machine. Inputs are float32 ``[N, *input_shape]``; classification
targets are int64 ``[N]``, regression targets float32 ``[N, outputs]``.

Datasets and their defaults (see ``models.spec`` for the field ranges):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), pixels
  divided by 16 so they lie in [0, 1]. Input ``[64]`` (``shape: "flat"``, the default) or
  ``[1, 8, 8]`` (``shape: "image"``). ``n_samples`` defaults to all 1,797 (at most 1,797);
  the samples are put in a seeded random order and the first ``n_samples`` are kept.
- ``spirals`` {classes=2, noise=0.1, n_samples=1000}: ``classes`` spiral arms of 1.5 turns
  each, radius growing from 0 to 1, arms rotated 2π/classes apart; Gaussian noise of std
  ``noise`` added to both coordinates. Input ``[2]``.
- ``blobs`` {features=2, classes=3, n_samples=1000}: scikit-learn's ``make_blobs`` (centres in
  [-10, 10]^features, unit cluster std), then each feature standardised to mean 0, std 1.
  Input ``[features]``.
- ``teacher`` {features=10, outputs=1, noise=0, n_samples=1000}: x ~ N(0, I_features); y = a
  random teacher MLP features -> 32 -> 32 -> outputs with tanh hidden units. The teacher's
  output layer is rescaled and shifted (using a separate reference draw, so independent of
  ``n_samples``) so that every output has mean ≈ 0 and variance ≈ 1; targets are *not*
  standardised on the sample itself. Optional Gaussian ``noise`` is then added.
- ``adding`` {seq_len=20, n_samples=1000}: the adding problem (Hochreiter & Schmidhuber 1997,
  in the form of Le et al. 2015): each step is (value ~ U(0, 1), marker ∈ {0, 1}); exactly two
  markers, one in the first half ``[0, seq_len//2)`` and one in the second half; the target is
  the sum of the two marked values (mean 1, variance 1/6). Input ``[seq_len, 2]``, target ``[N, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # torch loads with the first dataset, not with spec validation in the API
    import torch

from models.spec import AddingData, BlobsData, DigitsData, SpiralsData, TeacherData

DIGITS_N = 1797
Task = Literal["classification", "regression"]


@dataclass
class Dataset:
    x: torch.Tensor  # float32, [N, *input_shape]
    y: torch.Tensor  # int64 [N] for classification, float32 [N, outputs] for regression
    task: Task
    input_shape: tuple[int, ...]  # without the batch dimension
    n_outputs: int  # classes, or regression outputs

    def __len__(self) -> int:
        return int(self.x.shape[0])


def dataset_shape(data: Any) -> tuple[tuple[int, ...], int, Task]:
    """``(input_shape, n_outputs, task)`` of a dataset spec, without making any data."""
    if isinstance(data, DigitsData):
        return ((1, 8, 8) if data.shape == "image" else (64,)), 10, "classification"
    if isinstance(data, SpiralsData):
        return (2,), data.classes, "classification"
    if isinstance(data, BlobsData):
        return (data.features,), data.classes, "classification"
    if isinstance(data, TeacherData):
        return (data.features,), data.outputs, "regression"
    if isinstance(data, AddingData):
        return (data.seq_len, 2), 1, "regression"
    raise TypeError(f"not a dataset spec: {data!r}")


def n_samples_of(data: Any) -> int:
    """The number of samples the dataset will have (digits: all 1,797 unless ``n_samples``)."""
    if isinstance(data, DigitsData):
        return DIGITS_N if data.n_samples is None else data.n_samples
    return data.n_samples


def make_dataset(data: Any) -> Dataset:
    """Make the dataset a ``DataSpec`` describes (deterministic from ``data.seed``)."""
    input_shape, n_outputs, task = dataset_shape(data)
    if isinstance(data, DigitsData):
        x, y = _digits(data)
    elif isinstance(data, SpiralsData):
        x, y = _spirals(data)
    elif isinstance(data, BlobsData):
        x, y = _blobs(data)
    elif isinstance(data, TeacherData):
        x, y = _teacher(data)
    elif isinstance(data, AddingData):
        x, y = _adding(data)
    else:  # pragma: no cover - dataset_shape raised already
        raise TypeError(f"not a dataset spec: {data!r}")
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(len(x), *input_shape)
    if task == "classification":
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    else:
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).reshape(len(y), n_outputs)
    return Dataset(x=xt, y=yt, task=task, input_shape=tuple(input_shape), n_outputs=n_outputs)


# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _digits(data: DigitsData) -> tuple[np.ndarray, np.ndarray]:
    x, y = _digits_arrays()
    n = n_samples_of(data)
    if n > len(x):
        raise ValueError(f"digits has only {len(x)} samples, n_samples={n} asked")
    order = np.random.default_rng(data.seed).permutation(len(x))[:n]
    return x[order].copy(), y[order].copy()


def _spirals(data: SpiralsData) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(data.seed)
    n, k = data.n_samples, data.classes
    y = np.arange(n) % k
    rng.shuffle(y)
    t = rng.uniform(0.0, 1.0, size=n)
    r = t
    theta = 2.0 * math.pi * y / k + 3.0 * math.pi * t  # 1.5 turns per arm
    x = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    x = x + data.noise * rng.standard_normal(size=x.shape)
    return x, y


def _blobs(data: BlobsData) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_blobs

    x, y = make_blobs(
        n_samples=data.n_samples,
        n_features=data.features,
        centers=data.classes,
        cluster_std=1.0,
        center_box=(-10.0, 10.0),
        shuffle=True,
        random_state=data.seed,
    )
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-8)
    return x, y


def _teacher(data: TeacherData) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(data.seed)
    f, o, hidden = data.features, data.outputs, 32
    w1 = rng.standard_normal((f, hidden)) * math.sqrt(2.0 / f)
    b1 = 0.1 * rng.standard_normal(hidden)
    w2 = rng.standard_normal((hidden, hidden)) * math.sqrt(2.0 / hidden)
    b2 = 0.1 * rng.standard_normal(hidden)
    w3 = rng.standard_normal((hidden, o)) / math.sqrt(hidden)

    def hidden_of(x: np.ndarray) -> np.ndarray:
        return np.tanh(np.tanh(x @ w1 + b1) @ w2 + b2)

    # fold the output scale into the teacher, from a reference draw of its own
    ref = hidden_of(np.random.default_rng([data.seed, 1]).standard_normal((4096, f))) @ w3
    mu, sd = ref.mean(axis=0), np.maximum(ref.std(axis=0), 1e-8)
    x = rng.standard_normal((data.n_samples, f))
    y = (hidden_of(x) @ w3 - mu) / sd
    if data.noise > 0:
        y = y + data.noise * rng.standard_normal(y.shape)
    return x, y


def _adding(data: AddingData) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(data.seed)
    n, t = data.n_samples, data.seq_len
    half = t // 2
    values = rng.uniform(0.0, 1.0, size=(n, t))
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, t, size=n)
    markers = np.zeros((n, t))
    rows = np.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=2)
    y = (values[rows, first] + values[rows, second])[:, None]
    return x, y
