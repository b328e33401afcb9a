"""Data: synthetic, digits, MNIST/CIFAR-10 readers, sharding, augmentation."""

import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn.data import (
    DatasetError,
    ShardedSampler,
    SyntheticDataset,
    load_cifar10,
    load_digits,
    load_mnist,
    normalize_cifar10,
    random_crop_flip,
    read_cifar10_batch,
    read_idx,
    read_mnist_images,
    read_mnist_labels,
)

# --- synthetic --------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
       num_classes=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_synthetic_shapes_labels_and_determinism(shape, num_classes, seed):
    data = SyntheticDataset(50, shape, num_classes, seed=seed)
    x, y = data[[0, 7, 49]]
    assert x.shape == (3, *shape) and x.dtype == np.float32
    assert y.dtype == np.int64 and np.all((0 <= y) & (y < num_classes))
    x2, y2 = SyntheticDataset(50, shape, num_classes, seed=seed)[[0, 7, 49]]
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_synthetic_sample_does_not_depend_on_its_batch():
    data = SyntheticDataset(10, (3, 4, 4), 10, seed=5)
    x, y = data[[2, 9, 4]]
    x9, y9 = data[[9]]
    np.testing.assert_array_equal(x[1], x9[0])
    assert y[1] == y9[0]
    assert not np.array_equal(data[[2]][0], SyntheticDataset(10, (3, 4, 4), 10, seed=6)[[2]][0])
    with pytest.raises(IndexError):
        data[[10]]


# --- digits -----------------------------------------------------------------

def test_digits_split_is_fixed_disjoint_and_stratified():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    xa, ya = load_digits("all")
    assert x.shape == (1442, 1, 8, 8) and xt.shape == (355, 1, 8, 8) and xa.shape[0] == 1797
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10)) and np.bincount(yt).min() >= 34
    # train and test partition "all": every row of "all" is in exactly one of them
    rows = {r.tobytes() + bytes([c]) for r, c in zip(xa, ya)}
    assert len({r.tobytes() + bytes([c]) for r, c in zip(np.concatenate([x, xt]),
                                                         np.concatenate([y, yt]))}) == len(rows)
    np.testing.assert_array_equal(load_digits("train")[0], x)


def test_digits_standardize_uses_train_statistics():
    x, _ = load_digits("train", standardize=True)
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-4
    with pytest.raises(ValueError):
        load_digits("validation")


# --- MNIST IDX --------------------------------------------------------------

def idx_bytes(array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data, compress=False):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture
def mnist_arrays():
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, 6, dtype=np.uint8))


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_round_trip(tmp_path, mnist_arrays, compress):
    images, labels = mnist_arrays
    suffix = ".gz" if compress else ""
    write(tmp_path / f"t10k-images-idx3-ubyte{suffix}", idx_bytes(images), compress)
    write(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", idx_bytes(labels), compress)
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0] * 255, images, atol=1e-3)
    np.testing.assert_array_equal(y, labels)


def test_idx_other_types_come_back_in_native_byte_order(tmp_path):
    values = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(values, 0x0C)))
    assert out.dtype == np.dtype("=i4")
    np.testing.assert_array_equal(out, values)


CORRUPT_IDX = {
    "empty": b"",
    "bad magic": b"\x08\x03\x00\x00" + bytes(16),
    "unknown type": bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"x",
    "truncated header": bytes([0, 0, 8, 3]) + struct.pack(">I", 2),
    "truncated data": bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + bytes(100),
    "trailing data": bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + bytes(3),
    # 4e9 * 4e9 * 4e9 bytes promised: must be refused before any allocation
    "huge header": bytes([0, 0, 8, 3]) + struct.pack(">3I", 4_000_000_000, 4_000_000_000,
                                                     4_000_000_000) + bytes(10),
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("case", CORRUPT_IDX)
def test_corrupt_idx_files_give_a_clear_error(tmp_path, case, compress):
    path = write(tmp_path / "bad-idx", CORRUPT_IDX[case], compress)
    with pytest.raises(DatasetError, match="bad-idx"):
        read_idx(path)


def test_corrupt_gzip_stream(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((2, 4, 4), np.uint8)))
    path = write(tmp_path / "images.gz", good[:-12])
    with pytest.raises(DatasetError, match="images.gz"):
        read_mnist_images(path)
    path = write(tmp_path / "garbage.gz", good[:10] + b"\xff" * 40)
    with pytest.raises(DatasetError, match="garbage.gz"):
        read_mnist_images(path)


def test_mnist_content_errors(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    bad_labels = labels.copy()
    bad_labels[3] = 10
    with pytest.raises(DatasetError, match="out of range"):
        read_mnist_labels(write(tmp_path / "labels", idx_bytes(bad_labels)))
    with pytest.raises(DatasetError, match="3-D"):
        read_mnist_images(write(tmp_path / "labels-as-images", idx_bytes(labels)))
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels[:5]))
    with pytest.raises(DatasetError, match="5 labels"):
        load_mnist(tmp_path, "train")


def test_mnist_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nothing")


# --- CIFAR-10 ---------------------------------------------------------------

def cifar_bytes(images, labels):
    return np.concatenate([labels[:, None].astype(np.uint8), images.reshape(len(images), -1)],
                          axis=1).tobytes()


def random_cifar(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def test_cifar_batch_round_trip(tmp_path):
    images, labels = random_cifar(4)
    x, y = read_cifar10_batch(write(tmp_path / "test_batch.bin", cifar_bytes(images, labels)))
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert x.dtype == np.uint8 and y.dtype == np.int64 and x.flags.c_contiguous


def test_load_cifar10_from_parent_directory(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    parts = [random_cifar(2, seed=i) for i in range(5)]
    for i, (images, labels) in enumerate(parts, 1):
        write(folder / f"data_batch_{i}.bin", cifar_bytes(images, labels))
    x, y = load_cifar10(tmp_path, "train")
    np.testing.assert_array_equal(x, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]))
    with pytest.raises(FileNotFoundError, match="test_batch.bin"):
        load_cifar10(tmp_path, "test")
    z = normalize_cifar10(x)
    assert z.dtype == np.float32 and z.shape == x.shape


@pytest.mark.parametrize("case", ["empty", "truncated", "bad label"])
def test_corrupt_cifar_batch(tmp_path, case):
    images, labels = random_cifar(3)
    if case == "bad label":
        labels[1] = 200
    data = cifar_bytes(images, labels)
    data = {"empty": b"", "truncated": data[:-1], "bad label": data}[case]
    with pytest.raises(DatasetError, match="data_batch_1.bin"):
        read_cifar10_batch(write(tmp_path / "data_batch_1.bin", data))


# --- sharding ---------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_shards_partition_the_global_batch_independently_of_world_size(data):
    world_size = data.draw(st.integers(1, 6), "P")
    local = data.draw(st.integers(1, 5), "B/P")
    batch = world_size * local
    size = data.draw(st.integers(batch, 4 * batch + 3), "N")
    seed = data.draw(st.integers(0, 2**32 - 1), "seed")
    epoch = data.draw(st.integers(0, 3), "epoch")
    single = ShardedSampler(size, batch, 0, 1, seed)
    ranks = [ShardedSampler(size, batch, r, world_size, seed) for r in range(world_size)]
    seen = []
    for step in range(single.steps_per_epoch):
        shards = [s.indices(epoch, step) for s in ranks]
        assert all(len(s) == local and s.dtype == np.int64 for s in shards)
        # concatenating the ranks' shards in rank order gives the 1-rank batch
        np.testing.assert_array_equal(np.concatenate(shards), single.indices(epoch, step))
        seen.extend(np.concatenate(shards))
    assert len(seen) == len(set(seen)) == (size // batch) * batch   # no sample twice per epoch
    assert all(0 <= i < size for i in seen)


def test_epochs_reshuffle_and_shuffle_false_keeps_order():
    sampler = ShardedSampler(100, 10, seed=1)
    assert not np.array_equal(sampler.indices(0, 0), sampler.indices(1, 0))
    np.testing.assert_array_equal(sampler.indices(1, 3), ShardedSampler(100, 10, seed=1)
                                  .indices(1, 3))
    ordered = ShardedSampler(25, 10, rank=1, world_size=2, shuffle=False)
    np.testing.assert_array_equal(ordered.indices(0, 1), np.arange(15, 20))
    assert ordered.steps_per_epoch == 2


@settings(max_examples=20, deadline=None)
@given(start=st.integers(0, 20), world_size=st.sampled_from([1, 2, 4]))
def test_resume_continues_the_uninterrupted_sequence(start, world_size):
    sampler = ShardedSampler(45, 8, rank=world_size - 1, world_size=world_size, seed=7)
    full = list(sampler.iterate(num_epochs=5))
    epoch, step = divmod(start, sampler.steps_per_epoch)
    resumed = list(ShardedSampler(45, 8, rank=world_size - 1, world_size=world_size, seed=7)
                   .iterate(epoch, step, num_epochs=5))
    assert len(resumed) == len(full) - start
    for (e1, s1, i1), (e2, s2, i2) in zip(full[start:], resumed):
        assert (e1, s1) == (e2, s2)
        np.testing.assert_array_equal(i1, i2)


@pytest.mark.parametrize("args,match", [
    ((100, 10, 0, 3), "divisible"),
    ((8, 10, 0, 1), "smaller"),
    ((100, 10, 2, 2), "rank"),
])
def test_sampler_errors(args, match):
    with pytest.raises(ValueError, match=match):
        ShardedSampler(*args)


def test_sampler_refuses_a_resume_point_outside_the_epoch():
    sampler = ShardedSampler(100, 10)
    with pytest.raises(ValueError, match="step 10"):
        next(sampler.iterate(0, 10))


# --- augmentation -----------------------------------------------------------

def crop_flip_loop(x, rng, pad):
    """One image at a time, the obvious way: the oracle for the vectorised version."""
    n = len(x)
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flip = rng.random(n) < 0.5
    h, w = x.shape[2:]
    out = np.empty_like(x)
    for i in range(n):
        padded = np.pad(x[i], ((0, 0), (pad, pad), (pad, pad)))
        crop = padded[:, offsets[i, 0]:offsets[i, 0] + h, offsets[i, 1]:offsets[i, 1] + w]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       pad=st.integers(0, 4), seed=st.integers(0, 1000),
       dtype=st.sampled_from([np.uint8, np.float32]))
def test_crop_flip_matches_per_image_loop(n, c, h, w, pad, seed, dtype):
    x = np.random.default_rng(seed).integers(0, 255, (n, c, h, w)).astype(dtype)
    out = random_crop_flip(x, np.random.default_rng(seed), pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, crop_flip_loop(x, np.random.default_rng(seed), pad))


def test_crop_flip_is_deterministic_from_the_generator_and_varies():
    x = random_cifar(64)[0]
    a = random_crop_flip(x, np.random.default_rng(0))
    np.testing.assert_array_equal(a, random_crop_flip(x, np.random.default_rng(0)))
    assert not np.array_equal(a, random_crop_flip(x, np.random.default_rng(1)))
    assert not np.array_equal(a, x)
