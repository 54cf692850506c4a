"""The shipped digits, plain and distorted: shapes, seeding, the split, bad arguments."""
import pytest
import torch

from accelprune.datasets import digits, distorted_digits


def test_distorted_digits_shapes_and_standardisation():
    train, test = distorted_digits(12, seed=0)
    plain_train, plain_test = digits(12, seed=0)
    assert len(train) == len(plain_train) and len(test) == len(plain_test)
    x, y = train[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    images, labels = test.tensors
    assert images.shape == (len(test), 3, 12, 12)
    assert torch.equal(labels, plain_test.tensors[1])  # the same split as digits()
    assert abs(float(images.mean())) < 0.2 and 0.8 < float(images.std()) < 1.2


def test_test_set_is_fixed_by_the_seed_and_training_draws_afresh():
    a_train, a_test = distorted_digits(12, seed=3)
    b_train, b_test = distorted_digits(12, seed=3)
    assert torch.equal(a_test.tensors[0], b_test.tensors[0])
    first = [a_train[i][0] for i in range(3)]
    assert all(torch.equal(f, b_train[i][0]) for i, f in enumerate(first))  # same stream
    assert not torch.equal(a_train[0][0], first[0])  # a second access is a new distortion
    _, other = distorted_digits(12, seed=4)
    assert not torch.equal(other.tensors[0][:10], a_test.tensors[0][:10])


def test_no_distortion_is_the_plain_images():
    train, test = distorted_digits(12, rotation=0, scale=0, shift=0, noise=0, seed=0)
    _, plain = digits(12, seed=0)
    # identical up to the standardisation (both are affine maps of the same pixels)
    a, b = test.tensors[0].flatten(), plain.tensors[0].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9999


@pytest.mark.parametrize("kwargs", [{"rotation": -1}, {"scale": 1.0}, {"noise": "x"},
                                    {"size": 4}, {"test_fraction": 1.0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        distorted_digits(**kwargs)
