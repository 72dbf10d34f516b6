"""MNIST in its original IDX format: a small numpy reader with checksum verification.

IDX layout (big-endian): two zero bytes, a type code (0x08 = uint8), the number of dimensions ``k``, then
``k`` uint32 sizes, then the raw values in C order. MNIST images are ``(n, 28, 28)`` uint8 (magic
0x00000803), labels ``(n,)`` uint8 (magic 0x00000801).

Where the files come from (first hit wins), see :func:`resolve_file`:

1. ``data_dir`` given by the caller (``--data-dir``): only there, an error if missing;
2. the copy committed in the project (``<repo>/data/mnist``), so a fresh clone runs offline;
3. a cache directory (``$FASTDML_DATA_DIR``, else ``$XDG_CACHE_HOME/fastdml/mnist``, else
   ``~/.cache/fastdml/mnist``);
4. a download from the canonical mirrors into the cache, when the network allows.

Every file is verified by the SHA-256 of its *decompressed* content (the gzip wrapper of a file may differ
from the canonical one; the content may not). A corrupt, truncated or wrong file raises :class:`MnistDataError`
naming the file: never a silent wrong dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FILES",
    "MIRRORS",
    "MnistDataError",
    "MnistSplit",
    "parse_idx",
    "read_idx",
    "resolve_file",
    "load_mnist",
    "project_data_dir",
    "cache_dir",
]

# name -> (SHA-256 of the decompressed content, decompressed size in bytes, expected shape)
FILES: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "train-images-idx3-ubyte": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        47040016,
        (60000, 28, 28),
    ),
    "train-labels-idx1-ubyte": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60008,
        (60000,),
    ),
    "t10k-images-idx3-ubyte": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        7840016,
        (10000, 28, 28),
    ),
    "t10k-labels-idx1-ubyte": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10008,
        (10000,),
    ),
}

# The canonical mirrors (the ones torchvision uses); files are fetched as ``<mirror><name>.gz``.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# IDX type code -> numpy big-endian dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MnistDataError(RuntimeError):
    """A data file is missing, corrupt, truncated, or not the expected MNIST file."""


@dataclass
class MnistSplit:
    """One split: ``images`` (n, 28, 28) uint8 and ``labels`` (n,) int64 (numpy arrays)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a numpy array (native byte order).

    The header is ``0, 0, type, k`` then ``k`` big-endian uint32 sizes; the payload must hold exactly
    ``prod(sizes) * itemsize`` bytes. Raises :class:`MnistDataError` naming ``name`` otherwise.
    """
    if len(data) < 4:
        raise MnistDataError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero1, zero2, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise MnistDataError(
            f"{name}: not an IDX file (magic bytes {data[:4].hex()}; expected 0000 + type code + ndim)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MnistDataError(f"{name}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise MnistDataError(
            f"{name}: IDX payload {kind}: header says shape {tuple(shape)} = {expected} bytes, file has {got}"
        )
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    # a writable array in native byte order (frombuffer views the read-only bytes)
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


_CHUNK = 1 << 20  # decompression reads this many bytes at a time


def _declared_size(header: bytes) -> int | None:
    """Total bytes (header + payload) an IDX file with this header holds, or None if it is no complete header."""
    if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES or header[3] == 0:
        return None
    end = 4 + 4 * header[3]
    if len(header) < end:
        return None
    shape = struct.unpack(f">{header[3]}I", header[4:end])
    return end + int(np.prod(shape, dtype=np.int64)) * _IDX_DTYPES[header[2]].itemsize


def _read_bytes(path: Path, size: int | None = None) -> bytes:
    """The decompressed bytes of ``path`` (gzip if the name ends in .gz), read no further than needed.

    The IDX header (read first) declares the file's length; at most that many bytes plus one are
    decompressed, so a file that inflates far beyond it (a gzip bomb) costs no more memory than the
    declared content. ``size``: the expected length; a header declaring another length stops the read at
    the header. Corrupt compression -> :class:`MnistDataError`; the length checks are :func:`read_idx`'s.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            header = f.read(4)
            if len(header) == 4 and header[0] == 0 and header[1] == 0:
                header += f.read(4 * header[3])
            declared = _declared_size(header)
            if declared is None or (size is not None and declared != size):
                return header  # not IDX, or not the expected file: the header alone tells
            chunks, total = [header], len(header)
            while total <= declared:
                chunk = f.read(min(_CHUNK, declared + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            return b"".join(chunks)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise MnistDataError(
            f"{path}: cannot decompress ({type(exc).__name__}: {exc}); the file is "
            "corrupt or truncated, delete it or pass another --data-dir"
        ) from exc


def read_idx(path: str | os.PathLike, sha256: str | None = None, size: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    ``sha256``/``size``: the expected SHA-256 hex digest and length of the decompressed content; a mismatch
    raises :class:`MnistDataError` naming the file before anything is parsed. Content beyond the length its
    IDX header declares is an error found without decompressing the rest.
    """
    path = Path(path)
    if not path.is_file():
        raise MnistDataError(f"{path}: no such file")
    data = _read_bytes(path, size)
    declared = _declared_size(data)
    if declared is None:
        parse_idx(data, str(path))  # raises: not an IDX file, or a truncated header
    if size is not None and declared != size:
        raise MnistDataError(
            f"{path}: IDX header declares {declared} bytes (shape {_shape(data)}), expected {size} (wrong file)"
        )
    if len(data) > declared:
        raise MnistDataError(
            f"{path}: decompresses beyond the {declared} bytes its IDX header declares (shape {_shape(data)}); "
            "stopped reading (corrupt or wrong file)"
        )
    if size is not None and len(data) != size:
        raise MnistDataError(f"{path}: decompressed size {len(data)} bytes, expected {size} (truncated or wrong file)")
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise MnistDataError(
                f"{path}: SHA-256 of the decompressed content is {digest}, expected {sha256} (corrupt or wrong file)"
            )
    return parse_idx(data, str(path))


def _shape(header: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{header[3]}I", header[4 : 4 + 4 * header[3]])


def project_data_dir() -> Path:
    """``<repo>/data/mnist`` of a source checkout (or editable install)."""
    return Path(__file__).resolve().parents[2] / "data" / "mnist"


def cache_dir() -> Path:
    """The download cache: ``$FASTDML_DATA_DIR``, else ``$XDG_CACHE_HOME/fastdml/mnist``, else ``~/.cache``."""
    env = os.environ.get("FASTDML_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdml" / "mnist"


def _find_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _download(name: str, folder: Path, timeout: float = 30.0) -> Path:
    """Fetch ``<name>.gz`` from the first mirror that answers into ``folder`` (atomic rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload = response.read()
        except Exception as exc:  # network errors differ by platform; all mean "try the next mirror"
            errors.append(f"{url}: {exc}")
            continue
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        target = folder / f"{name}.gz"
        os.replace(tmp, target)
        return target
    raise MnistDataError(
        f"{name}: not found locally and the download failed ({'; '.join(errors)}). "
        "Pass --data-dir with the four MNIST .gz files."
    )


def resolve_file(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Where ``name`` (e.g. ``"t10k-images-idx3-ubyte"``) is read from; see the module docstring."""
    if data_dir is not None:
        found = _find_in(Path(data_dir), name)
        if found is None:
            raise MnistDataError(f"{name}: not found in --data-dir {data_dir} (looked for {name}.gz and {name})")
        return found
    for folder in (project_data_dir(), cache_dir()):
        found = _find_in(folder, name)
        if found is not None:
            return found
    if not download:
        raise MnistDataError(f"{name}: not found in {project_data_dir()} or {cache_dir()} and download is off")
    return _download(name, cache_dir())


def load_file(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> np.ndarray:
    """Resolve, verify (SHA-256 of the decompressed content) and parse one MNIST file."""
    if name not in FILES:
        raise ValueError(f"name must be one of {sorted(FILES)}, got {name!r}")
    sha, size, shape = FILES[name]
    array = read_idx(resolve_file(name, data_dir, download), sha256=sha, size=size)
    if array.shape != shape:  # cannot happen after the checksum; kept as a guard for edited FILES tables
        raise MnistDataError(f"{name}: shape {array.shape}, expected {shape}")
    return array


def load_mnist(split: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> MnistSplit:
    """The ``"train"`` (60,000) or ``"test"`` (10,000) split as uint8 images and int64 labels."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = load_file(f"{prefix}-images-idx3-ubyte", data_dir, download)
    labels = load_file(f"{prefix}-labels-idx1-ubyte", data_dir, download)
    return MnistSplit(images=images, labels=labels.astype(np.int64))
