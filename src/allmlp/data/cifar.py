"""CIFAR-10/100 in the standard "python version" download, read without executing anything from the files.

The batches are Python 2 pickles of dicts holding a uint8 numpy array and lists. Unpickling can call any importable
function, so `SafeUnpickler` resolves only the three globals a numpy array needs and maps them to the small
builders below, which accept plain numeric dtypes and raw bytes and nothing else. numpy's own pickle hooks are never
called.
"""

from __future__ import annotations

import io
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import torch


class _NDArrayType:
    """Stands for numpy.ndarray: it may only appear as the type argument of _reconstruct."""

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray may only be used as the array type of _reconstruct")


_PLAIN_DTYPE = re.compile(r"^(?:[iuf][1248]|b1)$")


class _PickledDtype:
    """numpy.dtype(spec, align, copy) followed by BUILD(state): only integer, float and bool dtypes."""

    def __init__(self, spec=None, align=False, copy=False):
        if isinstance(spec, bytes):
            spec = spec.decode("ascii", "replace")
        if not isinstance(spec, str) or not _PLAIN_DTYPE.match(spec):
            raise pickle.UnpicklingError(f"refused dtype {spec!r}: only plain integer/float/bool arrays are read")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state) -> None:
        # (version, byte order, subarray, names, fields, itemsize, alignment, flags): plain dtypes have no structure
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[2:5] == (None, None, None)):
            raise pickle.UnpicklingError(f"refused dtype state {state!r}: structured dtypes are not read")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"refused dtype byte order {order!r}")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _PickledArray:
    """numpy.core.multiarray._reconstruct(ndarray, shape, dtype) followed by BUILD(state) with the raw bytes."""

    def __init__(self, array_type, shape, typecode):
        if array_type is not _NDArrayType:
            raise pickle.UnpicklingError("_reconstruct may only build a numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("refused array state: expected (version, shape, dtype, fortran, bytes)")
        _, shape, dtype, fortran, data = state
        if isinstance(data, str):  # Python 2 str unpickled with encoding="latin1"
            data = data.encode("latin1")
        valid_shape = isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)
        if not (valid_shape and isinstance(dtype, _PickledDtype) and isinstance(data, bytes)):
            raise pickle.UnpicklingError("refused array state: expected a shape, a plain dtype and raw bytes")
        if len(data) != int(np.prod(shape)) * dtype.dtype.itemsize:
            raise pickle.UnpicklingError(f"array of shape {shape} and dtype {dtype.dtype} has {len(data)} bytes")
        self.array = np.frombuffer(data, dtype.dtype).reshape(shape, order="F" if fortran else "C").copy()


class SafeUnpickler(pickle.Unpickler):
    """Resolves only numpy.core.multiarray._reconstruct (also spelt numpy._core), numpy.ndarray and numpy.dtype,
    each to a builder that can produce nothing but a plain numeric array. Everything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _PickledArray,
        ("numpy._core.multiarray", "_reconstruct"): _PickledArray,
        ("numpy", "ndarray"): _NDArrayType,
        ("numpy", "dtype"): _PickledDtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only arrays and lists")
        return self.ALLOWED[(module, name)]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: a CIFAR batch has none")


def _plain(value):
    """Unpickled value -> plain Python/numpy: arrays from their builders, bytes dict keys as str."""
    if isinstance(value, _PickledArray):
        return value.array
    if isinstance(value, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, _PickledDtype | _NDArrayType):
        raise pickle.UnpicklingError("a dtype or array type outside an array")
    return value


def load_batch(data: bytes, name: str) -> dict:
    """Unpickle one CIFAR batch or meta file safely; a file that needs anything else is a ValueError."""
    try:
        value = _plain(SafeUnpickler(io.BytesIO(data), encoding="bytes").load())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError, RecursionError) as e:
        raise ValueError(f"{name}: not a readable CIFAR python batch ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a dict, found {type(value).__name__}")
    return value


# (folder in the archive, archive name, train batches, test batches, meta file, label key, class-name key)
LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ["train"],
        ["test"],
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}


def _read_files(root: Path, kind: str, names: list[str]) -> dict[str, bytes]:
    """Files of the download by name, from the extracted folder or, in one pass, from the .tar.gz as downloaded."""
    folder, archive, *_, meta, _, _ = LAYOUTS[kind]
    for candidate in (root / folder, root):
        if (candidate / meta).is_file():
            missing = [name for name in names if not (candidate / name).is_file()]
            if missing:
                raise ValueError(f"{candidate}: missing {', '.join(missing)} of the {kind} download")
            return {name: (candidate / name).read_bytes() for name in names}
    if (root / archive).is_file():
        wanted = {f"{folder}/{name}": name for name in names}
        found = {}
        with tarfile.open(root / archive, "r|gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = tar.extractfile(member).read()
        missing = [name for name in names if name not in found]
        if missing:
            raise ValueError(f"{root / archive}: missing {', '.join(missing)} in the archive")
        return found
    raise ValueError(
        f"data.root={str(root)!r}: no {kind} download found; expected {folder}/ (holding {meta}), "
        f"the files themselves, or {archive}"
    )


def read_cifar(root: str | Path, kind: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images (N, 3, 32, 32), int64 labels (N,), class names) of the train or test split."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data.root must be an existing folder holding the {kind} download, got {str(root)!r}")
    _, _, train_files, test_files, meta, label_key, names_key = LAYOUTS[kind]
    batch_files = train_files if train else test_files
    files = _read_files(root, kind, [meta, *batch_files])
    names = load_batch(files[meta], meta).get(names_key)
    if not isinstance(names, list) or not names:
        raise ValueError(f"{kind} {meta}: no {names_key!r} list of class names")
    class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    images, labels = [], []
    for name in batch_files:
        batch = load_batch(files[name], name)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            raise ValueError(f"{kind} {name}: 'data' must be a uint8 array (N, 3072)")
        if not isinstance(batch_labels, list) or len(batch_labels) != len(data):
            raise ValueError(f"{kind} {name}: {label_key!r} must list one label per image ({len(data)})")
        images.append(torch.from_numpy(data).view(-1, 3, 32, 32))
        labels.append(torch.tensor(batch_labels, dtype=torch.int64))
    targets = torch.cat(labels)
    if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < len(class_names)):
        raise ValueError(f"{kind}: labels must lie in [0, {len(class_names)}), found {targets.min()}..{targets.max()}")
    return torch.cat(images), targets, class_names
