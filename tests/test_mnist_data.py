"""The MNIST IDX reader: the real committed files, corrupt/truncated copies, and where files are looked for."""

import gzip
import hashlib
import io
import shutil
import struct
import urllib.request

import numpy as np
import pytest

from fastdml.demo import data
from fastdml.demo.data import FILES, MnistDataError, load_mnist, parse_idx, read_idx

TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
REAL_DIR = data.project_data_dir()  # captured before any test monkeypatches it


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def test_split_dir(tmp_path):
    """A private copy of the two committed test-split files (tests may damage it)."""
    for name in (TEST_IMAGES, TEST_LABELS):
        shutil.copy(REAL_DIR / f"{name}.gz", tmp_path / f"{name}.gz")
    return tmp_path


def test_committed_test_split_reads_with_verified_checksums():
    split = load_mnist("test", download=False)
    assert split.images.shape == (10000, 28, 28) and split.images.dtype == np.uint8
    assert split.labels.shape == (10000,) and split.labels.dtype == np.int64
    # published facts about the MNIST test set: the first labels and the count of each digit
    assert split.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(split.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert split.images.min() == 0 and split.images.max() == 255
    assert split.images.flags.writeable


def test_committed_train_split_reads():
    split = load_mnist("train", download=False)
    assert split.images.shape == (60000, 28, 28)
    assert np.bincount(split.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.parametrize(
    "dtype, code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)]
)
def test_parse_idx_round_trips_every_type(dtype, code):
    array = (np.arange(2 * 3 * 5).reshape(2, 3, 5) * 3 - 7).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    out = parse_idx(_idx_bytes(array, code))
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX file"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x00\x01\x02", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x01\x02", "trailing bytes"),
    ],
)
def test_parse_idx_rejects_malformed_bytes_naming_the_source(blob, message):
    with pytest.raises(MnistDataError, match=message) as info:
        parse_idx(blob, "some-file")
    assert "some-file" in str(info.value)


def test_truncated_gzip_file_is_an_error_naming_the_file(test_split_dir):
    path = test_split_dir / f"{TEST_IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(MnistDataError, match="corrupt or truncated") as info:
        load_mnist("test", data_dir=test_split_dir, download=False)
    assert TEST_IMAGES in str(info.value)


def test_garbled_gzip_stream_is_an_error_naming_the_file(test_split_dir):
    path = test_split_dir / f"{TEST_LABELS}.gz"
    raw = bytearray(path.read_bytes())
    for i in range(100, 200):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(MnistDataError) as info:
        load_mnist("test", data_dir=test_split_dir, download=False)
    assert TEST_LABELS in str(info.value)


def test_one_changed_pixel_fails_the_checksum(test_split_dir):
    path = test_split_dir / f"{TEST_IMAGES}.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[5000] ^= 0x01  # a valid IDX file with one different pixel: only the checksum can tell
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(MnistDataError, match="SHA-256") as info:
        load_mnist("test", data_dir=test_split_dir, download=False)
    assert TEST_IMAGES in str(info.value)


def test_validly_compressed_but_shortened_content_fails_the_size_check(test_split_dir):
    path = test_split_dir / f"{TEST_LABELS}.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:5000]))
    with pytest.raises(MnistDataError, match="decompressed size 5000") as info:
        load_mnist("test", data_dir=test_split_dir, download=False)
    assert TEST_LABELS in str(info.value)


def test_uncompressed_files_are_read_too(tmp_path):
    for name in (TEST_IMAGES, TEST_LABELS):
        (tmp_path / name).write_bytes(gzip.decompress((REAL_DIR / f"{name}.gz").read_bytes()))
    split = load_mnist("test", data_dir=tmp_path, download=False)
    assert split.images.shape == (10000, 28, 28)


def test_read_idx_without_checksum_reads_any_idx_file(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    with pytest.raises(MnistDataError, match="no such file"):
        read_idx(tmp_path / "missing.gz")


def test_data_dir_is_exclusive_and_a_missing_file_there_is_named(tmp_path):
    with pytest.raises(MnistDataError, match=f"{TEST_IMAGES}: not found in --data-dir"):
        load_mnist("test", data_dir=tmp_path, download=False)


def test_bad_split_name_is_rejected():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")


def test_cache_is_used_when_the_project_copy_is_absent(tmp_path, monkeypatch, test_split_dir):
    monkeypatch.setattr(data, "project_data_dir", lambda: tmp_path / "no-project-copy")
    monkeypatch.setenv("FASTDML_DATA_DIR", str(test_split_dir))
    assert data.resolve_file(TEST_IMAGES, download=False) == test_split_dir / f"{TEST_IMAGES}.gz"
    assert len(load_mnist("test", download=False)) == 10000


def test_download_goes_into_the_cache_and_is_verified(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(data, "project_data_dir", lambda: tmp_path / "no-project-copy")
    monkeypatch.setenv("FASTDML_DATA_DIR", str(cache))
    served = []

    def fake_urlopen(url, timeout=None):
        served.append(url)
        if url.startswith(data.MIRRORS[0]):
            raise OSError("mirror down")  # the first mirror fails: the next one is tried
        name = url.rsplit("/", 1)[1]
        return io.BytesIO((REAL_DIR / name).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    split = load_mnist("test")
    assert len(split) == 10000
    assert (cache / f"{TEST_IMAGES}.gz").is_file() and (cache / f"{TEST_LABELS}.gz").is_file()
    assert any(url.startswith(data.MIRRORS[1]) for url in served)
    digest = hashlib.sha256(gzip.decompress((cache / f"{TEST_LABELS}.gz").read_bytes())).hexdigest()
    assert digest == FILES[TEST_LABELS][0]


def test_failed_download_and_disabled_download_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "project_data_dir", lambda: tmp_path / "no-project-copy")
    monkeypatch.setenv("FASTDML_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(MnistDataError, match="download is off"):
        load_mnist("test", download=False)

    def offline(url, timeout=None):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MnistDataError, match="download failed"):
        load_mnist("test")


def _peak_bytes_of(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


BOMB = 64 << 20  # zero bytes appended to a valid IDX file: compresses to about 64 KB


def test_gzip_bomb_is_rejected_after_reading_no_more_than_the_header_declares(tmp_path):
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(_idx_bytes(np.arange(4, dtype=np.uint8).reshape(2, 2)))
        f.write(bytes(BOMB))
    assert path.stat().st_size < BOMB // 100
    with pytest.raises(MnistDataError, match="beyond the 16 bytes its IDX header declares") as info:
        read_idx(path)
    assert "bomb.gz" in str(info.value)
    peak = _peak_bytes_of(lambda: pytest.raises(MnistDataError, read_idx, path))
    assert peak < 4 * (1 << 20), peak  # bounded by the read chunk, not by the inflated size


def test_gzip_bomb_with_the_mnist_header_is_rejected_with_bounded_memory(tmp_path):
    labels = gzip.decompress((REAL_DIR / f"{TEST_LABELS}.gz").read_bytes())
    with gzip.open(tmp_path / f"{TEST_LABELS}.gz", "wb", compresslevel=9) as f:
        f.write(labels)
        f.write(bytes(BOMB))
    shutil.copy(REAL_DIR / f"{TEST_IMAGES}.gz", tmp_path / f"{TEST_IMAGES}.gz")
    with pytest.raises(MnistDataError, match="beyond the 10008 bytes") as info:
        data.load_file(TEST_LABELS, tmp_path, download=False)
    assert TEST_LABELS in str(info.value)
    peak = _peak_bytes_of(lambda: pytest.raises(MnistDataError, data.load_file, TEST_LABELS, tmp_path, False))
    assert peak < 4 * (1 << 20), peak


def test_header_declaring_another_size_stops_at_the_header(tmp_path):
    # a header declaring 64 MiB of labels: the labels' expected size rules it out from the header alone
    with gzip.open(tmp_path / f"{TEST_LABELS}.gz", "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", BOMB))
        f.write(bytes(BOMB))
    with pytest.raises(MnistDataError, match=f"declares {BOMB + 8} bytes .* expected 10008") as info:
        data.load_file(TEST_LABELS, tmp_path, download=False)
    assert TEST_LABELS in str(info.value)
    peak = _peak_bytes_of(lambda: pytest.raises(MnistDataError, data.load_file, TEST_LABELS, tmp_path, False))
    assert peak < 1 << 20, peak
