"""The ensemble's input pipeline (engine/pipeline.py) on one process."""

import numpy as np
import pytest

from cnn.data import crop_flip, normalize_cifar10, random_crop_flip
from engine.pipeline import CompressedImages, Pipeline


def test_crop_flip_is_random_crop_flip_with_the_draws_made_outside():
    x = np.random.default_rng(0).integers(0, 255, (6, 3, 8, 8), dtype=np.uint8)
    expected = random_crop_flip(x, np.random.default_rng(5), pad=2)
    rng = np.random.default_rng(5)
    offsets, flip = rng.integers(0, 5, size=(6, 2)), rng.random(6) < 0.5
    np.testing.assert_array_equal(crop_flip(x, offsets, flip, pad=2), expected)


def test_compressed_images_decode_deterministically():
    a, b = CompressedImages(20, seed=3), CompressedImages(20, seed=3)
    x, y = a.read(np.array([4, 0, 19]))
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, b.read(np.array([4, 0, 19]))[0])
    assert len(a) == 20 and not np.array_equal(x, CompressedImages(20, seed=4).read([4, 0, 19])[0])
    with pytest.raises(ValueError, match="size must be >= 1"):
        CompressedImages(0)


@pytest.mark.parametrize("lo, hi", [(0, 12), (0, 4), (4, 8), (9, 12)])
def test_any_slice_of_a_batch_equals_that_slice_of_the_whole_batch(lo, hi):
    data = CompressedImages(48, seed=1)
    pipeline = Pipeline(data.read, len(data), 12, seed=2, crop_pad=4, normalize=normalize_cifar10)
    for epoch, step in ((0, 0), (2, 3)):
        full_x, full_y = pipeline.batch(epoch, step)
        x, y = pipeline.batch(epoch, step, lo, hi)
        assert x.dtype == np.float32 and x.flags.c_contiguous
        np.testing.assert_array_equal(x, full_x[lo:hi])
        np.testing.assert_array_equal(y, full_y[lo:hi])
    assert pipeline.cpu_s > 0
    # Another step draws other crops (and other samples).
    assert not np.array_equal(pipeline.batch(0, 1)[0], pipeline.batch(0, 0)[0])
