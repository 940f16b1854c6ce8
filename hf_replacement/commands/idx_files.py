"""Fashion-MNIST's IDX files as Debian's `dataset-fashion-mnist` installs them: where they are, the class names,
the file names and a reader. numpy only: code that reads the raw arrays (the composed detection and segmentation
canvases of `examples/task_data.py`, the benchmark harness) does not need `datasets`, which `data.py` builds the
launcher's data sets with.
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np

from .errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# split -> (images, labels) file names, without the optional ".gz"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) with `ndim` dimensions, checking its header."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            with open(path, "rb") as handle:
                raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable (gzip) file: {error}. Re-download or reinstall it.") from error
    # IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        magic = raw[:4].hex() if len(raw) >= 4 else repr(raw[:4])
        raise DataError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes: magic {magic}, expected 000008{ndim:02x}."
        )
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path} is truncated: the header ends after {len(raw)} bytes.")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) + offset
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes but its header {shape} needs {expected}: the file is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_FILES", "FASHION_MNIST_LABELS", "read_idx"]
