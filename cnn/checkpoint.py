"""Checkpoints: one ``.npz`` file, written atomically, read without unpickling.

Layout of the archive::

    checkpoint.json     0-d unicode array: format, version, epoch, iteration,
                        RNG state, metadata, the names of the arrays below,
                        and the optimizer state with arrays replaced by
                        {"__array__": key}
    params/<name>       one array per model parameter
    buffers/<name>      one array per buffer (BN running statistics)
    optimizer/<n>       the optimizer state's arrays (momentum), numbered
    shard/<n>           a sharded checkpoint's pieces of weights and momentum (below)

A *sharded* checkpoint (written when the training state is itself sharded
across ranks, as by the multistep strategy) is one file per rank. Each holds
the slices its rank owns as pieces ``{"name", "kind", "layout", "start",
"stop", "shape"}`` of a parameter (``kind`` "params") or of its momentum
("momentum"): ``"flat"`` is the range [start, stop) of the flattened tensor
of that shape, ``"columns"`` its columns [start, stop) (a fully-connected
weight owned by input neuron), stored transposed. Rank 0's file also holds
the buffers, the rest of the optimizer state and the metadata, and lists the
other ranks' files; `load_checkpoint` of it reads them all and returns
whole tensors, so a sharded checkpoint loads like any other, on any number
of ranks.

Design constraints:

1. A crash at any moment leaves the previous checkpoint intact: write a
   temporary file in the same directory, flush and fsync it, ``os.replace``
   it over the target (atomic on POSIX), then fsync the directory so the
   rename itself survives a power loss.
2. Loading never executes code from the file: ``np.load(allow_pickle=False)``,
   object arrays refused, the RNG state is JSON text rather than a pickle.
3. Every way a file can be wrong (truncated, corrupt, missing entries, a
   header promising more data than is stored) gives a `CheckpointError`
   naming the file, checked before the array is allocated.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

__all__ = ["Checkpoint", "CheckpointError", "generator_from_state", "load_checkpoint",
           "publish_checkpoint", "save_checkpoint", "shard_name", "sharded_files"]

FORMAT = "cnn-checkpoint"
VERSION = 1
_HEADER = "checkpoint.json"
_ARRAY = "__array__"
_BIT_GENERATORS = {cls.__name__: cls for cls in (np.random.PCG64, np.random.PCG64DXSM,
                                                 np.random.Philox, np.random.SFC64,
                                                 np.random.MT19937)}
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, truncated, or lacks an entry."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns.

    Attributes
    ----------
    params, buffers : dict of str to ndarray
    optimizer : dict or None
        As given to `save_checkpoint` (e.g. ``SGD.state_dict()``); tuples
        come back as lists.
    epoch, iteration : int
    rng_state : dict or None
        ``Generator.bit_generator.state``; see `rng`.
    metadata : dict
    """

    params: dict
    buffers: dict = field(default_factory=dict)
    optimizer: dict | None = None
    epoch: int = 0
    iteration: int = 0
    rng_state: dict | None = None
    metadata: dict = field(default_factory=dict)

    def rng(self) -> np.random.Generator | None:
        """A Generator continuing exactly where the saved one stopped."""
        return None if self.rng_state is None else generator_from_state(self.rng_state)


def generator_from_state(state: Mapping) -> np.random.Generator:
    """Rebuild a Generator from ``bit_generator.state`` (as saved, JSON-decoded)."""
    name = state.get("bit_generator")
    if name not in _BIT_GENERATORS:
        raise CheckpointError(f"unknown bit generator {name!r} in RNG state")
    bit_generator = _BIT_GENERATORS[name]()
    bit_generator.state = _from_json_rng(state)
    return np.random.Generator(bit_generator)


def save_checkpoint(path: str | os.PathLike, params: Mapping[str, np.ndarray], *,
                    buffers: Mapping[str, np.ndarray] | None = None,
                    optimizer: Mapping | None = None, epoch: int = 0, iteration: int = 0,
                    rng: np.random.Generator | None = None,
                    metadata: Mapping | None = None, shard: Mapping | None = None):
    """Write a checkpoint atomically (see the module docstring).

    Parameters
    ----------
    path : path-like
        Written exactly as given (no ``.npz`` is appended).
    params : mapping of str to ndarray
        E.g. ``{p.name: p.data for p in model.parameters()}``.
    buffers : mapping of str to ndarray, optional
        E.g. ``dict(model.buffers())``.
    optimizer : mapping, optional
        Nested dicts/lists of arrays, numbers, strings, bools and None,
        e.g. ``SGD.state_dict()``.
    epoch, iteration : int
        Where to resume.
    rng : numpy.random.Generator, optional
        Its state is stored so that data order and augmentation resume
        identically.
    metadata : mapping, optional
        Anything JSON-able (configuration, git revision, metrics).
    shard : mapping, optional
        This file is one of a sharded checkpoint (module docstring):
        ``{"rank": r, "of": P, "pieces": [{"name", "kind", "layout", "start",
        "stop", "shape", "data"}], "files": [...]}``, where ``files`` (rank 0
        only) names the other ranks' files, relative to this one's directory,
        in rank order. Parameters stored as pieces are left out of `params`,
        and the optimizer state carries no ``momentum_buffers``.

    Raises
    ------
    TypeError
        If something cannot be stored without pickle; nothing is written.
    """
    path = Path(path)
    arrays = {}
    for prefix, named in (("params", params), ("buffers", buffers or {})):
        for name, array in named.items():
            arrays[f"{prefix}/{name}"] = _storable(array, f"{prefix}/{name}")
    optimizer_arrays = {}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "params": list(params),
        "buffers": list(buffers or {}),
        "optimizer": None if optimizer is None else _encode(optimizer, optimizer_arrays),
        "rng": None if rng is None else _to_json_rng(rng.bit_generator.state),
        "metadata": dict(metadata or {}),
    }
    arrays.update(optimizer_arrays)
    if shard is not None:
        header["shard"] = _encode_shard(shard, arrays)
    try:
        arrays[_HEADER] = np.array(json.dumps(header))
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: metadata is not JSON-able ({e})") from e
    _atomic_write(path, arrays)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    CheckpointError
        If it is not a complete, well-formed checkpoint, or holds pickled
        objects.
    """
    path = Path(path)
    header, checkpoint = _load(path)
    shard = header.get("shard")
    if shard is None:
        return checkpoint
    if "files" not in shard:
        raise CheckpointError(f"{path}: shard {shard.get('rank')} of {shard.get('of')} of a "
                              "sharded checkpoint; load the checkpoint that lists it (rank 0's)")
    pieces = list(checkpoint.optimizer.pop("shard_pieces"))
    try:
        if len(shard["files"]) != int(shard["of"]) - 1:
            raise CheckpointError(f"{path}: lists {len(shard['files'])} shard files for "
                                  f"{shard['of']} ranks")
        for rank, name in enumerate(shard["files"], start=1):
            if Path(name).name != name:     # only files beside this one are ever read
                raise CheckpointError(f"{path}: shard file name {name!r} is not a plain name")
            other = path.parent / name
            try:
                other_header, other_checkpoint = _load(other)
            except FileNotFoundError:
                raise CheckpointError(f"{path}: its shard file {other} is missing") from None
            theirs = other_header.get("shard") or {}
            if (theirs.get("rank"), theirs.get("of"), other_header.get("iteration")) != (
                    rank, shard["of"], header["iteration"]):
                raise CheckpointError(
                    f"{other}: not shard {rank} of {shard['of']} at iteration "
                    f"{header['iteration']} (holds shard {theirs.get('rank')} of "
                    f"{theirs.get('of')} at iteration {other_header.get('iteration')})")
            pieces += other_checkpoint.optimizer["shard_pieces"]
        whole = _assemble(pieces, path)
        if set(whole["params"]) & set(checkpoint.params):
            raise CheckpointError(f"{path}: parameters both whole and in pieces: "
                                  f"{sorted(set(whole['params']) & set(checkpoint.params))}")
        checkpoint.params.update(whole["params"])
        checkpoint.optimizer["momentum_buffers"] = {name: value.reshape(-1) for name, value
                                                in whole["momentum"].items()}
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: corrupt sharded checkpoint ({type(e).__name__}: {e})"
                              ) from e
    return checkpoint


def publish_checkpoint(source: str | os.PathLike, target: str | os.PathLike):
    """Make `target` name the complete file `source` (a hard link), atomically.

    How a sharded checkpoint is committed once every rank's file is on disk:
    a crash before the rename leaves `target` naming the previous one.
    Copies where the file system has no hard links.
    """
    def link(tmp: Path):
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())

    _replace_atomically(Path(target), link)


def shard_name(target: Path, iteration: int, rank: int, size: int) -> Path:
    """The file rank `rank` of `size` writes for a sharded checkpoint at `iteration`."""
    return target.with_name(f"{target.stem}.{iteration}.{rank}-of-{size}{target.suffix}")


def sharded_files(target: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every sharded file beside `target`, of any rank count."""
    pattern = re.compile(re.escape(target.stem) + r"\.(\d+)\.\d+-of-\d+"
                         + re.escape(target.suffix))
    return [(int(match.group(1)), Path(entry.path)) for entry in os.scandir(target.parent)
            if (match := pattern.fullmatch(entry.name))]


def _load(path: Path) -> tuple[dict, Checkpoint]:
    """One file's header and contents; a shard's pieces under optimizer["shard_pieces"]."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # EOFError, BadZipFile, "pickled data" ValueError, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})"
                              ) from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: not a checkpoint (a single .npy array, not an archive)")
    with archive:
        try:
            header = json.loads(str(_read(archive, _HEADER, path)[()]))
            if header.get("format") != FORMAT or header.get("version") != VERSION:
                raise CheckpointError(f"{path}: format {header.get('format')!r} version "
                                      f"{header.get('version')!r}, expected {FORMAT!r} "
                                      f"version {VERSION}")
            checkpoint = Checkpoint(
                params={n: _read(archive, f"params/{n}", path) for n in header["params"]},
                buffers={n: _read(archive, f"buffers/{n}", path) for n in header["buffers"]},
                optimizer=_decode(header["optimizer"], lambda key: _read(archive, key, path)),
                epoch=int(header["epoch"]),
                iteration=int(header["iteration"]),
                rng_state=header["rng"],
                metadata=header["metadata"],
            )
            if "shard" in header:
                checkpoint.optimizer = dict(checkpoint.optimizer or {})
                checkpoint.optimizer["shard_pieces"] = [
                    {**piece, "data": _read(archive, piece["data"][_ARRAY], path)}
                    for piece in header["shard"]["pieces"]]
            return header, checkpoint
        except CheckpointError:
            raise
        except KeyError as e:
            raise CheckpointError(f"{path}: header lacks {e}") from e
        except Exception as e:  # whatever zipfile, numpy's header parser or json raise
            raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from e


def _storable(array, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError(f"save_checkpoint: {where} holds Python objects, which would need pickle")
    return array


def _encode(tree, arrays: dict):
    """Replace arrays in a nested structure by references into `arrays`."""
    if isinstance(tree, np.ndarray):
        key = f"optimizer/{len(arrays)}"
        arrays[key] = _storable(tree, "optimizer state")
        return {_ARRAY: key}
    if isinstance(tree, Mapping):
        if _ARRAY in tree or not all(isinstance(k, str) for k in tree):
            raise TypeError(f"save_checkpoint: optimizer state keys must be strings other "
                            f"than {_ARRAY!r}")
        return {k: _encode(v, arrays) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_encode(v, arrays) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"save_checkpoint: cannot store {type(tree).__name__} in optimizer state")


_LAYOUTS = ("flat", "columns")
_KINDS = ("params", "momentum")


def _encode_shard(shard: Mapping, arrays: dict) -> dict:
    """The header entry of a shard; its pieces' data go to `arrays` as shard/<n>."""
    pieces = []
    for piece in shard["pieces"]:
        if piece["layout"] not in _LAYOUTS or piece["kind"] not in _KINDS:
            raise TypeError(f"save_checkpoint: shard piece kind must be one of {_KINDS} and "
                            f"layout one of {_LAYOUTS}, got {piece['kind']!r}, "
                            f"{piece['layout']!r}")
        key = f"shard/{len(pieces)}"
        arrays[key] = _storable(piece["data"], key)
        pieces.append({"name": str(piece["name"]), "kind": piece["kind"],
                       "layout": piece["layout"], "start": int(piece["start"]),
                       "stop": int(piece["stop"]), "shape": [int(n) for n in piece["shape"]],
                       "data": {_ARRAY: key}})
    entry = {"rank": int(shard["rank"]), "of": int(shard["of"]), "pieces": pieces}
    if "files" in shard:
        entry["files"] = [str(name) for name in shard["files"]]
    return entry


def _assemble(pieces: list, path: Path) -> dict:
    """Whole tensors, by kind and name, from every rank's pieces, each element exactly once."""
    groups: dict[tuple, list] = {}
    for piece in pieces:
        groups.setdefault((piece["kind"], piece["name"]), []).append(piece)
    whole: dict[str, dict] = {kind: {} for kind in _KINDS}
    for (kind, name), parts in groups.items():
        shape = tuple(parts[0]["shape"])
        layouts = {part["layout"] for part in parts}
        if kind not in _KINDS or len(layouts) != 1 or not layouts <= set(_LAYOUTS) or (
                "columns" in layouts and len(shape) != 2) or any(
                tuple(part["shape"]) != shape for part in parts):
            raise CheckpointError(f"{path}: the {kind} pieces of {name!r} disagree (layouts "
                                  f"{sorted(layouts)}, shapes "
                                  f"{sorted({tuple(part['shape']) for part in parts})})")
        columns = "columns" in layouts
        extent = shape[1] if columns else math.prod(shape)
        what = f"the {kind} pieces of {name!r}"
        unit = "columns" if columns else "elements"
        tensor = np.empty(shape if columns else extent, parts[0]["data"].dtype)
        covered = 0
        for part in sorted(parts, key=lambda part: part["start"]):
            start, stop, data = part["start"], part["stop"], part["data"]
            expected = (stop - start) * (shape[0] if columns else 1)
            if start != covered or stop < start or data.size != expected:
                raise CheckpointError(f"{path}: {what} do not tile its {extent} {unit} (piece "
                                      f"[{start}, {stop}) of {data.size} values after "
                                      f"{covered})")
            if columns:
                tensor[:, start:stop] = data.reshape(stop - start, shape[0]).T
            else:
                tensor[start:stop] = data.reshape(-1)
            covered = stop
        if covered != extent:
            raise CheckpointError(f"{path}: {what} cover {covered} of its {extent} {unit}")
        whole[kind][name] = tensor.reshape(shape)
    return whole


def _decode(tree, read):
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY}:
            return read(tree[_ARRAY])
        return {k: _decode(v, read) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_decode(v, read) for v in tree]
    return tree


def _to_json_rng(state):
    # MT19937 keeps its key as an array; everything else is ints and strings.
    if isinstance(state, dict):
        return {k: _to_json_rng(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return {_ARRAY: state.tolist(), "dtype": state.dtype.str}
    if isinstance(state, np.generic):
        return state.item()
    return state


def _from_json_rng(state):
    if isinstance(state, dict):
        if _ARRAY in state:
            return np.array(state[_ARRAY], dtype=np.dtype(state["dtype"]))
        return {k: _from_json_rng(v) for k, v in state.items()}
    return state


def _read(archive, key: str, path: Path) -> np.ndarray:
    """Read one entry after checking its header against the stored size."""
    try:
        info = archive.zip.getinfo(key + ".npy")
    except KeyError:
        raise CheckpointError(f"{path}: missing entry {key!r}") from None
    with archive.zip.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in _NPY_HEADER_READERS:
            raise CheckpointError(f"{path}: entry {key!r} has npy format {version}")
        shape, _, dtype = _NPY_HEADER_READERS[version](member)
        if dtype.hasobject:
            raise CheckpointError(f"{path}: entry {key!r} holds Python objects (pickle); refused")
        stored = info.file_size - member.tell()
    if stored != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{path}: entry {key!r} claims shape {shape} {dtype} but "
                              f"stores {stored} bytes")
    return archive[key]


def _write_arrays(f, arrays: Mapping[str, np.ndarray]):
    """The one step that writes the data; tests replace it to simulate a crash.

    The layout of ``np.savez`` (an uncompressed zip of ``.npy`` members), but
    each array's memory goes to the file as it is: ``np.savez`` copies every
    array into a bytes object first, which for a 114 MB checkpoint cost 60 ms
    of CPU against 28 ms for the CRC and 22 ms for the write itself.
    """
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            if not (array.flags.c_contiguous or array.flags.f_contiguous):
                array = array.copy(order="C")       # (ascontiguousarray would make 0-d 1-d)
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = npy_format.header_data_from_array_1_0(array)
                try:
                    npy_format.write_array_header_1_0(member, header)
                except ValueError:          # a header over 64 KiB needs version 2.0
                    npy_format.write_array_header_2_0(member, header)
                # The bytes in memory order (the header says C or Fortran), no copy.
                member.write(memoryview(array.ravel(order="K").view(np.uint8)))


def _atomic_write(path: Path, arrays: Mapping[str, np.ndarray]):
    def write(tmp: Path):
        with open(tmp, "xb") as f:
            _write_arrays(f, arrays)
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(path, write)


def _replace_atomically(target: Path, make: Callable[[Path], None]):
    """`make` a temporary file beside `target`, rename it over `target`, fsync the directory."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        make(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(path: Path):
    """So that a rename in it survives a power loss."""
    directory = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
