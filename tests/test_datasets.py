"""Built-in datasets: shapes, dtypes, determinism from the seed, definitions."""

from __future__ import annotations

import pytest
import torch

from models.datasets import DIGITS_N, Dataset, dataset_shape, make_dataset
from models.spec import AddingData, BlobsData, DigitsData, JobSpec, SpiralsData, TeacherData

torch.set_num_threads(1)

SPECS = [
    DigitsData(name="digits"),
    DigitsData(name="digits", shape="image", n_samples=300, seed=3),
    SpiralsData(name="spirals"),
    SpiralsData(name="spirals", classes=3, noise=0.05, n_samples=301, seed=1),
    BlobsData(name="blobs"),
    BlobsData(name="blobs", features=5, classes=6, n_samples=120, seed=2),
    TeacherData(name="teacher"),
    TeacherData(name="teacher", features=6, outputs=3, n_samples=200, seed=4),
    AddingData(name="adding"),
    AddingData(name="adding", seq_len=7, n_samples=50, seed=5),
]


@pytest.mark.parametrize("data", SPECS, ids=lambda d: f"{d.name}-{d.seed}")
def test_shapes_dtypes_and_dataset_shape(data):
    ds = make_dataset(data)
    assert isinstance(ds, Dataset)
    input_shape, n_outputs, task = dataset_shape(data)
    assert (ds.input_shape, ds.n_outputs, ds.task) == (input_shape, n_outputs, task)
    n = DIGITS_N if data.name == "digits" and data.n_samples is None else data.n_samples
    assert ds.x.shape == (n, *input_shape) and ds.x.dtype == torch.float32 and len(ds) == n
    assert torch.isfinite(ds.x).all()
    if task == "classification":
        assert ds.y.shape == (n,) and ds.y.dtype == torch.int64
        assert ds.y.min() >= 0 and ds.y.max() < n_outputs
    else:
        assert ds.y.shape == (n, n_outputs) and ds.y.dtype == torch.float32
        assert torch.isfinite(ds.y).all()


@pytest.mark.parametrize("data", SPECS, ids=lambda d: f"{d.name}-{d.seed}")
def test_deterministic_from_seed(data):
    a, b = make_dataset(data), make_dataset(data)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = make_dataset(data.model_copy(update={"seed": data.seed + 10}))
    assert not torch.equal(a.x, other.x)


def test_defaults_are_documented_values():
    spec = JobSpec.model_validate({"network": {"layers": [{"type": "relu"}]}, "data": {"name": "spirals"}})
    assert (spec.data.classes, spec.data.noise, spec.data.n_samples, spec.data.seed) == (2, 0.1, 1000, 0)
    assert dataset_shape(BlobsData(name="blobs")) == ((2,), 3, "classification")
    assert dataset_shape(TeacherData(name="teacher")) == ((10,), 1, "regression")
    assert dataset_shape(AddingData(name="adding")) == ((20, 2), 1, "regression")
    assert dataset_shape(DigitsData(name="digits")) == ((64,), 10, "classification")
    assert dataset_shape(DigitsData(name="digits", shape="image")) == ((1, 8, 8), 10, "classification")


def test_digits_pixels_in_unit_range_and_image_is_reshaped_flat():
    flat = make_dataset(DigitsData(name="digits"))
    img = make_dataset(DigitsData(name="digits", shape="image"))
    assert flat.x.min() == 0.0 and flat.x.max() == 1.0
    assert torch.equal(img.x.reshape(len(img), 64), flat.x) and torch.equal(img.y, flat.y)
    assert set(flat.y.tolist()) == set(range(10))
    sub = make_dataset(DigitsData(name="digits", n_samples=100, seed=1))
    rows = {tuple(r) for r in flat.x.tolist()}
    assert all(tuple(r) in rows for r in sub.x.tolist())


def test_adding_problem_definition():
    ds = make_dataset(AddingData(name="adding", seq_len=30, n_samples=500, seed=7))
    values, markers = ds.x[..., 0], ds.x[..., 1]
    assert ((values >= 0) & (values <= 1)).all()
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    assert (markers.sum(1) == 2).all()
    assert (markers[:, :15].sum(1) == 1).all() and (markers[:, 15:].sum(1) == 1).all()
    assert torch.allclose(ds.y[:, 0], (values * markers).sum(1), atol=1e-6)


def test_teacher_targets_have_unit_ish_variance():
    for features, outputs in [(6, 3), (20, 1), (100, 2)]:
        ds = make_dataset(TeacherData(name="teacher", features=features, outputs=outputs, n_samples=3000, seed=1))
        var, mean = ds.y.var(0), ds.y.mean(0)
        assert ((var > 0.7) & (var < 1.4)).all(), var
        assert (mean.abs() < 0.2).all()
    # the teacher does not depend on n_samples: a smaller draw is a prefix of the same function
    small = make_dataset(TeacherData(name="teacher", n_samples=10, seed=2))
    big = make_dataset(TeacherData(name="teacher", n_samples=20, seed=2))
    assert torch.equal(small.x, big.x[:10]) and torch.equal(small.y, big.y[:10])
    noisy = make_dataset(TeacherData(name="teacher", noise=0.5, n_samples=2000))
    assert noisy.y.var() > 1.1


def test_spirals_balanced_and_noise_scales():
    ds = make_dataset(SpiralsData(name="spirals", classes=3, noise=0.0, n_samples=300))
    assert ds.y.bincount().tolist() == [100, 100, 100]
    assert ds.x.norm(dim=1).max() <= 1.0 + 1e-6
    noisy = make_dataset(SpiralsData(name="spirals", classes=3, noise=1.0, n_samples=300))
    assert noisy.x.norm(dim=1).max() > 1.5


def test_blobs_standardised():
    ds = make_dataset(BlobsData(name="blobs", features=4, classes=5, n_samples=500, seed=3))
    assert torch.allclose(ds.x.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(ds.x.std(0, unbiased=False), torch.ones(4), atol=1e-4)
    assert ds.y.bincount().tolist() == [100] * 5
