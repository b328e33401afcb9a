"""Checkpoints: round trip, atomicity, refusal of corrupt and pickled files, exact resume."""

import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn import checkpoint
from cnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cnn.optim import SGD


@dataclass
class Param:
    """Stand-in for cnn.layers.Parameter (docs/cnn_contract.md)."""

    name: str
    data: np.ndarray
    grad: np.ndarray


def sample_state(seed=0):
    rng = np.random.default_rng(seed)
    params = {"features.0.weight": rng.standard_normal((4, 3, 3, 3), np.float32),
              "classifier.bias": rng.standard_normal(10, np.float32)}
    buffers = {"features.1.running_mean": rng.standard_normal(4, np.float32),
               "features.1.num_batches_tracked": np.array(7, np.int64)}
    return params, buffers


def save_sample(path, rng=None, **overrides):
    params, buffers = sample_state()
    params_obj = [Param(n, a.copy(), np.ones_like(a)) for n, a in params.items()]
    opt = SGD(params_obj, lr=0.1, momentum=0.9, nesterov=True)
    opt.step()
    kwargs = {"buffers": buffers, "optimizer": opt.state_dict(), "epoch": 3,
              "iteration": 1234, "rng": rng,
              "metadata": {"model": "vgg11", "world_size": 4, "acc": [0.5, 0.75]}}
    kwargs.update(overrides)
    save_checkpoint(path, params, **kwargs)
    return params, buffers, opt.state_dict(), kwargs


def test_round_trip(tmp_path):
    rng = np.random.default_rng(42)
    rng.random(5)
    path = tmp_path / "ckpt.npz"
    params, buffers, opt_state, kwargs = save_sample(path, rng=rng)
    ckpt = load_checkpoint(path)
    assert ckpt.params.keys() == params.keys() and ckpt.buffers.keys() == buffers.keys()
    for name in params:
        np.testing.assert_array_equal(ckpt.params[name], params[name])
        assert ckpt.params[name].dtype == params[name].dtype
    for name in buffers:
        np.testing.assert_array_equal(ckpt.buffers[name], buffers[name])
    assert (ckpt.epoch, ckpt.iteration) == (3, 1234)
    assert ckpt.metadata == kwargs["metadata"]
    assert ckpt.optimizer["nesterov"] is True and ckpt.optimizer["lr"] == 0.1
    for name, v in opt_state["momentum_buffers"].items():
        np.testing.assert_array_equal(ckpt.optimizer["momentum_buffers"][name], v)
    # the restored generator continues the saved one's stream
    np.testing.assert_array_equal(ckpt.rng().random(8), rng.random(8))


def test_archive_members_are_those_of_np_savez(tmp_path):
    """The zero-copy writer stores exactly np.savez's members, byte for byte."""
    arrays = {"f32": np.arange(12, dtype=np.float32).reshape(3, 4),
              "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              "strided": np.arange(10, dtype=np.int16)[::3],
              "scalar": np.array(7, np.int64), "flag": np.array(True),
              "text": np.array("{\"json\": \"héllo\"}"), "empty": np.zeros((0, 3), np.float64),
              "big_endian": np.arange(5, dtype=">f8")}
    with open(tmp_path / "ours.npz", "wb") as f:
        checkpoint._write_arrays(f, arrays)
    np.savez(tmp_path / "numpy.npz", allow_pickle=False, **arrays)
    with zipfile.ZipFile(tmp_path / "ours.npz") as ours, \
            zipfile.ZipFile(tmp_path / "numpy.npz") as reference:
        assert ours.namelist() == reference.namelist()
        for name in reference.namelist():
            assert ours.getinfo(name).compress_type == zipfile.ZIP_STORED
            assert ours.read(name) == reference.read(name), name
    loaded = np.load(tmp_path / "ours.npz", allow_pickle=False)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_minimal_checkpoint_and_exact_path(tmp_path):
    path = tmp_path / "model.ckpt"   # no .npz appended
    save_checkpoint(path, {"w": np.arange(3.0)})
    ckpt = load_checkpoint(path)
    assert ckpt.optimizer is None and ckpt.rng() is None and ckpt.metadata == {}
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt"]


@pytest.mark.parametrize("bit_generator", [np.random.MT19937, np.random.Philox])
def test_other_bit_generators_round_trip(tmp_path, bit_generator):
    rng = np.random.Generator(bit_generator(5))
    save_checkpoint(tmp_path / "c.npz", {}, rng=rng)
    restored = load_checkpoint(tmp_path / "c.npz").rng()
    np.testing.assert_array_equal(restored.integers(0, 1000, 20), rng.integers(0, 1000, 20))


def test_rng_state_is_json_text_not_pickle(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {}, rng=np.random.default_rng(1))
    with zipfile.ZipFile(path) as archive:
        header = archive.read("checkpoint.json.npy")
    assert b"PCG64" in header.replace(b"\x00", b"")   # stored as unicode text


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    params, *_ = save_sample(path)
    good = path.read_bytes()

    def crashing_writer(f, arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint, "_write_arrays", crashing_writer)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": np.zeros(3)}, epoch=4)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.npz"]      # no stray temporary file
    np.testing.assert_array_equal(load_checkpoint(path).params["classifier.bias"],
                                  params["classifier.bias"])


def test_unstorable_values_are_refused_before_writing(tmp_path):
    path = tmp_path / "c.npz"
    with pytest.raises(TypeError):
        save_checkpoint(path, {"w": np.array([object()])})
    with pytest.raises(TypeError):
        save_checkpoint(path, {}, optimizer={"fn": print})
    with pytest.raises(TypeError):
        save_checkpoint(path, {}, metadata={"when": object()})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("keep", ["nothing", "100 bytes", "half", "all but the last byte"])
def test_truncated_checkpoint_gives_clear_error(tmp_path, keep):
    path = tmp_path / "ckpt.npz"
    save_sample(path)
    data = path.read_bytes()
    cut = {"nothing": 0, "100 bytes": 100, "half": len(data) // 2,
           "all but the last byte": len(data) - 1}[keep]
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="ckpt.npz"):
        load_checkpoint(path)


def test_corrupted_bytes_give_clear_error(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_sample(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("params/features.0.weight.npy")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle] ^= 0xFF   # one flipped byte inside an array: CRC mismatch
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ckpt.npz"):
        load_checkpoint(path)


def rewrite(path, drop=(), replace=None):
    """Copy an archive without some members, or with one member's bytes replaced."""
    with zipfile.ZipFile(path) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    for name in drop:
        del members[name]
    members.update(replace or {})
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("member", ["params/classifier.bias.npy", "checkpoint.json.npy",
                                    "optimizer/0.npy"])
def test_missing_entries_give_clear_error(tmp_path, member):
    path = tmp_path / "ckpt.npz"
    save_sample(path)
    rewrite(path, drop=[member])
    with pytest.raises(CheckpointError, match="ckpt.npz.*missing"):
        load_checkpoint(path)


def test_header_promising_more_data_than_stored_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_sample(path)
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    text = text.ljust(128 - 10 - 1) + b"\n"          # npy 1.0: padded to 64-byte multiple
    header = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text
    rewrite(path, replace={"params/classifier.bias.npy": header + bytes(40)})
    with pytest.raises(CheckpointError, match="claims shape"):
        load_checkpoint(path)
    rewrite(path, replace={"params/classifier.bias.npy": header[:40] + b"(((\n"})
    with pytest.raises(CheckpointError, match="ckpt.npz"):
        load_checkpoint(path)


def test_pickled_objects_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    # a plain pickle renamed .npz
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="evil.npz"):
        load_checkpoint(path)
    # a valid checkpoint whose parameter is an object array holding the exploit
    path = tmp_path / "ckpt.npz"
    save_sample(path)
    with zipfile.ZipFile(path) as archive:
        header = archive.read("checkpoint.json.npy")
    np.savez(tmp_path / "evil2.npz", allow_pickle=True,
             **{"params/classifier.bias": np.array([Exploit()], dtype=object)})
    rewrite(tmp_path / "evil2.npz", replace={"checkpoint.json.npy": header})
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "evil2.npz")
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="plain.npy"):
        load_checkpoint(tmp_path / "plain.npy")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="other.npz"):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.npz")


# --- exact resume -----------------------------------------------------------

def train(params, opt, rng, steps):
    """Least squares y = X w on fresh random batches: gradient X^T (X w - y) / n."""
    w, b = params
    for _ in range(steps):
        x = rng.standard_normal((8, 5), np.float32)
        y = x @ np.arange(5, dtype=np.float32) + 1
        residual = x @ w.data + b.data[0] - y
        w.grad[...] = x.T @ residual / np.float32(len(x))
        b.grad[...] = residual.mean(keepdims=True)
        opt.step()


def fresh_model():
    return [Param("linear.weight", np.zeros(5, np.float32), np.zeros(5, np.float32)),
            Param("linear.bias", np.zeros(1, np.float32), np.zeros(1, np.float32))]


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    def make_opt(params):
        return SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)

    reference = fresh_model()
    train(reference, make_opt(reference), np.random.default_rng(0), 20)

    params = fresh_model()
    opt, rng = make_opt(params), np.random.default_rng(0)
    train(params, opt, rng, 8)
    save_checkpoint(tmp_path / "c.npz", {p.name: p.data for p in params},
                    optimizer=opt.state_dict(), iteration=8, rng=rng)
    del params, opt, rng

    ckpt = load_checkpoint(tmp_path / "c.npz")
    params = fresh_model()
    for p in params:
        p.data[...] = ckpt.params[p.name]
    opt = make_opt(params)
    opt.load_state_dict(ckpt.optimizer)
    train(params, opt, ckpt.rng(), 20 - ckpt.iteration)
    for p, q in zip(reference, params):
        np.testing.assert_array_equal(p.data, q.data)


# -- sharded checkpoints ------------------------------------------------------------------

def save_sharded(directory, state, cuts, iteration=5):
    """Three ranks' files: "w" (6 x 4) by columns (stored as rows of its transpose), "b"
    flat, weights and momentum, cut at `cuts`; rank 0 keeps "c" whole."""
    params, momentum = state
    names = [f"ckpt.{iteration}.{r}-of-3.npz" for r in range(3)]
    w_cols, b_cuts = cuts
    for r in range(3):
        lo, hi = w_cols[r], w_cols[r + 1]
        pieces = []
        for kind, tensors in (("params", params), ("momentum", momentum)):
            pieces += [{"name": "w", "kind": kind, "layout": "columns", "start": lo, "stop": hi,
                        "shape": (6, 4), "data": np.ascontiguousarray(tensors["w"].T[lo:hi])},
                       {"name": "b", "kind": kind, "layout": "flat", "start": b_cuts[r],
                        "stop": b_cuts[r + 1], "shape": (6,),
                        "data": tensors["b"][b_cuts[r]:b_cuts[r + 1]]}]
        if r == 0:
            pieces.append({"name": "c", "kind": "momentum", "layout": "flat", "start": 0,
                           "stop": 3, "shape": (3,), "data": momentum["c"]})
        shard = {"rank": r, "of": 3, "pieces": pieces}
        if r == 0:
            shard["files"] = names[1:]
        save_checkpoint(directory / names[r], {"c": params["c"]} if r == 0 else {},
                        iteration=iteration, optimizer={"lr": 0.1} if r == 0 else None,
                        shard=shard)
    return directory / names[0]


@pytest.fixture
def sharded_state():
    rng = np.random.default_rng(4)
    shapes = {"w": (6, 4), "b": 6, "c": 3}
    return tuple({name: rng.standard_normal(shape, np.float32) for name, shape in shapes.items()}
                 for _ in range(2))


def test_a_sharded_checkpoint_loads_whole(tmp_path, sharded_state):
    params, momentum = sharded_state
    # rank 1 owns no column of w and no element of b: an empty piece is allowed
    path = save_sharded(tmp_path, sharded_state, ([0, 3, 3, 4], [0, 5, 5, 6]))
    ckpt = load_checkpoint(path)
    assert ckpt.iteration == 5 and ckpt.optimizer["lr"] == 0.1
    assert set(ckpt.params) == set(ckpt.optimizer["momentum_buffers"]) == {"w", "b", "c"}
    for name in ("w", "b", "c"):
        np.testing.assert_array_equal(ckpt.params[name], params[name])
        np.testing.assert_array_equal(ckpt.optimizer["momentum_buffers"][name],
                                      momentum[name].reshape(-1))


def test_a_sharded_checkpoint_that_does_not_tile_is_refused(tmp_path, sharded_state):
    path = save_sharded(tmp_path, sharded_state, ([0, 2, 3, 4], [0, 2, 4, 5]))   # b: 5 of 6
    with pytest.raises(CheckpointError, match="pieces of 'b' cover 5 of its 6 elements"):
        load_checkpoint(path)
    path = save_sharded(tmp_path, sharded_state, ([0, 2, 2, 4], [0, 3, 2, 6]))   # overlap
    with pytest.raises(CheckpointError, match="pieces of 'b' do not tile"):
        load_checkpoint(path)


def test_a_shard_of_another_checkpoint_is_named(tmp_path, sharded_state):
    cuts = ([0, 1, 2, 4], [0, 2, 4, 6])
    path = save_sharded(tmp_path, sharded_state, cuts)
    (tmp_path / "other").mkdir()
    save_sharded(tmp_path / "other", sharded_state, cuts, iteration=9)
    os.replace(tmp_path / "other" / "ckpt.9.2-of-3.npz", tmp_path / "ckpt.5.2-of-3.npz")
    with pytest.raises(CheckpointError, match="not shard 2 of 3 at iteration 5 .*iteration 9"):
        load_checkpoint(path)


def test_a_bad_shard_layout_writes_nothing(tmp_path):
    shard = {"rank": 0, "of": 1, "pieces": [{"name": "w", "kind": "params", "layout": "diagonal",
                                             "start": 0, "stop": 1, "shape": (1,),
                                             "data": np.zeros(1, np.float32)}]}
    with pytest.raises(TypeError, match="layout one of"):
        save_checkpoint(tmp_path / "c.npz", {"w": np.zeros(1, np.float32)}, shard=shard)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("links", [True, False])
def test_publish_replaces_the_target_in_one_step(tmp_path, monkeypatch, links):
    if not links:       # a file system without hard links: a copy, still renamed into place
        def no_link(*args):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "checkpoint.npz"
    save_checkpoint(target, {"w": np.zeros(3, np.float32)}, iteration=1)
    source = tmp_path / "checkpoint.2.0-of-1.npz"
    save_checkpoint(source, {"w": np.ones(3, np.float32)}, iteration=2)
    checkpoint.publish_checkpoint(source, target)
    assert load_checkpoint(target).iteration == 2
    assert target.samefile(source) == links
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name, target.name]


def test_a_shard_list_reaching_outside_the_directory_is_refused(tmp_path):
    shard = {"rank": 0, "of": 2, "pieces": [], "files": ["../elsewhere.npz"]}
    save_checkpoint(tmp_path / "c.npz", {"w": np.zeros(1, np.float32)}, optimizer={},
                    shard=shard)
    with pytest.raises(CheckpointError, match="'../elsewhere.npz' is not a plain name"):
        load_checkpoint(tmp_path / "c.npz")


@settings(max_examples=40, deadline=None)
@given(ranks=st.integers(1, 5), rows=st.integers(1, 7), cols=st.integers(1, 9),
       data=st.data())
def test_any_partition_of_weights_and_momentum_round_trips(tmp_path_factory, ranks, rows,
                                                           cols, data):
    """Random cut points (empty pieces included), a column-owned 2-d weight and a flat 1-d
    tensor: the loaded tensors are bitwise the ones that were cut up."""
    directory = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tensors = {kind: {"w": rng.standard_normal((rows, cols), np.float32),
                      "b": rng.standard_normal(rows * cols + 1, np.float32)}
               for kind in ("params", "momentum")}

    def cuts(n):
        inner = sorted(data.draw(st.lists(st.integers(0, n), min_size=ranks - 1,
                                          max_size=ranks - 1)))
        return [0, *inner, n]

    w_cuts, b_cuts = cuts(cols), cuts(rows * cols + 1)
    names = [f"ckpt.3.{r}-of-{ranks}.npz" for r in range(ranks)]
    for r in range(ranks):
        pieces = []
        for kind, t in tensors.items():
            pieces += [{"name": "w", "kind": kind, "layout": "columns", "start": w_cuts[r],
                        "stop": w_cuts[r + 1], "shape": (rows, cols),
                        "data": np.ascontiguousarray(t["w"].T[w_cuts[r]:w_cuts[r + 1]])},
                       {"name": "b", "kind": kind, "layout": "flat", "start": b_cuts[r],
                        "stop": b_cuts[r + 1], "shape": t["b"].shape,
                        "data": t["b"][b_cuts[r]:b_cuts[r + 1]]}]
        shard = {"rank": r, "of": ranks, "pieces": pieces}
        if r == 0:
            shard["files"] = names[1:]
        save_checkpoint(directory / names[r], {}, iteration=3, shard=shard,
                        optimizer={"lr": 0.1} if r == 0 else None)
    ckpt = load_checkpoint(directory / names[0])
    for name in ("w", "b"):
        np.testing.assert_array_equal(ckpt.params[name], tensors["params"][name])
        np.testing.assert_array_equal(ckpt.optimizer["momentum_buffers"][name],
                                      tensors["momentum"][name].reshape(-1))
