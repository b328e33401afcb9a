"""The ensemble's input pipeline (engine/pipeline.py) on one process."""

import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

from cnn.data import crop_flip, normalize_cifar10, random_crop_flip
from engine.pipeline import CompressedImages, Pipeline, Prefetcher, SeparateDelivery, wait_quietly


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


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_gives_every_result_in_order_then_stops(depth):
    made = []
    prefetcher = Prefetcher(lambda position: made.append(position) or position[1] * 10,
                            [(0, s) for s in range(5)], depth)
    try:
        assert [prefetcher.get() for _ in range(5)] == [0, 10, 20, 30, 40]
        for _ in range(2):
            with pytest.raises(StopIteration):
                prefetcher.get()
        assert made == [(0, s) for s in range(5)]
    finally:
        prefetcher.close()


def test_prefetcher_raises_the_threads_error_in_get_and_close_stops_it_early():
    def produce(position):
        if position == 2:
            raise OSError("disk gone at step 2")
        return position

    prefetcher = Prefetcher(produce, range(4), depth=2)
    assert prefetcher.get() == 0 and prefetcher.get() == 1
    with pytest.raises(OSError, match="disk gone at step 2"):
        prefetcher.get()
    prefetcher.close()
    # A thread blocked on a full queue ends when closed, with positions left.
    blocked = Prefetcher(lambda position: position, range(1000), depth=1)
    time.sleep(0.05)
    blocked.close()
    assert not any(t.name == "pipeline-prefetch" for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Prefetcher(lambda position: position, range(2), depth=-1)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_separate_delivery_makes_one_copy_per_member_of_the_pipelines_shard(prefetch):
    data = CompressedImages(48, seed=1)
    pipeline = Pipeline(data.read, len(data), 12, seed=2, crop_pad=4, normalize=normalize_cifar10)
    delivery = SeparateDelivery(pipeline, local_rank=1, group_size=3, copies=2, prefetch=prefetch)
    delivery.start([(0, 0), (1, 2)])
    try:
        for epoch, step in ((0, 0), (1, 2)):
            batch = delivery.next()
            first, second = batch(), batch()
            assert first[0] is not second[0]            # each member's own pipeline made it
            expected = pipeline.batch(epoch, step, 4, 8)
            for x, y in (first, second):
                np.testing.assert_array_equal(x, expected[0])
                np.testing.assert_array_equal(y, expected[1])
            with pytest.raises(StopIteration):
                batch()
    finally:
        delivery.close()
    # 2 copies of 2 shards of 4 samples, then the 2 reference shards.
    assert pipeline.samples == 2 * 2 * 4 + 2 * 4
    with pytest.raises(ValueError, match="copies must be >= 1"):
        SeparateDelivery(pipeline, 0, 1, copies=0)


def test_wait_quietly_completes_requests_without_spinning():
    comm = MPI.COMM_SELF.Dup()
    try:
        received = np.zeros(4)
        requests = [comm.Irecv(received, source=0, tag=5)]
        sender = threading.Timer(0.05, lambda: comm.Send(np.arange(4.0), dest=0, tag=5))
        sender.start()
        wall, cpu = time.monotonic(), time.thread_time()
        wait_quietly(requests)
        wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
        sender.join()
        np.testing.assert_array_equal(received, np.arange(4.0))
        assert wall >= 0.04 and cpu < 0.5 * wall      # MPI_Waitall would spin all along
    finally:
        comm.Free()
