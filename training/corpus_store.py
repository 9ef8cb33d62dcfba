"""The corpus folder on disk: model files, their metadata and the manifest, written atomically.

For a model id ``ID`` the folder holds ``ID.safetensors`` and its spec ``ID.json`` (the
`metaprune.formats` zoo format), then ``ID.meta.json``. The metadata is written last, so a model
is finished exactly when its ``ID.meta.json`` exists: a build killed while writing leaves weights
without metadata, and the next build redoes that model. ``manifest.json`` lists the finished
models' metadata and is replaced as a whole after each one.

Example::

    store_model(folder, artifact)         # artifact from corpus.train_model
    is_finished(folder, artifact.meta["model_id"])   # True
    write_manifest(folder, finished_metadata(folder))
"""

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
META_SUFFIX = ".meta.json"


@dataclass
class ModelArtifact:
    """A trained model as bytes, so a Ray worker can return it to a driver on another disk."""

    # file suffix (".safetensors", ".json") -> content, written as ID + suffix
    files: dict[str, bytes]
    # the metadata written as ID.meta.json (carries "model_id")
    meta: dict


def write_atomically(path: Path, payload: bytes) -> None:
    """Write `payload` to a temporary file beside `path`, then rename it over `path`.

    Readers see the old file or the whole new one, never a partial one.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def meta_path(folder: Path, model_id: str) -> Path:
    return Path(folder) / f"{model_id}{META_SUFFIX}"


def is_finished(folder: Path, model_id: str) -> bool:
    """True when the model's metadata, written after its weights, exists."""
    return meta_path(folder, model_id).is_file()


def store_model(folder: Path, artifact: ModelArtifact) -> Path:
    """Write the model's files, then its metadata (the finish mark); returns the meta path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_id = artifact.meta["model_id"]
    for suffix, payload in artifact.files.items():
        write_atomically(folder / f"{model_id}{suffix}", payload)
    target = meta_path(folder, model_id)
    write_atomically(target, json.dumps(artifact.meta, indent=1).encode())
    return target


def read_meta(folder: Path, model_id: str) -> dict:
    """The metadata of a finished model."""
    return json.loads(meta_path(folder, model_id).read_text())


def finished_metadata(folder: Path) -> dict[str, dict]:
    """Model id -> metadata of every finished model in `folder`."""
    found = {}
    for path in sorted(Path(folder).glob(f"*{META_SUFFIX}")):
        meta = json.loads(path.read_text())
        found[meta["model_id"]] = meta
    return found


def write_manifest(folder: Path, models: dict[str, dict]) -> Path:
    """Replace ``manifest.json`` with the given finished models, sorted by id."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "count": len(models),
        "models": [models[model_id] for model_id in sorted(models)],
    }
    path = Path(folder) / MANIFEST
    write_atomically(path, json.dumps(manifest, indent=1).encode())
    return path


def read_manifest(folder: Path) -> dict:
    """The manifest as written by `write_manifest`."""
    return json.loads((Path(folder) / MANIFEST).read_text())


def summarize(models: dict[str, dict]) -> list[str]:
    """One line per (dataset, family): models, held out, accuracy min/mean/max, mean seconds.

    Example::

        for line in summarize(finished_metadata("/work/corpus")):
            print(line)
        # fashion-mnist  resnet        10 (2 held out)  accuracy 0.731 / 0.802 / 0.861  88.1 s
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for meta in models.values():
        groups.setdefault((meta["dataset"], meta["family"]), []).append(meta)
    lines = []
    for (dataset, family), metas in sorted(groups.items()):
        accuracies = [meta["accuracy"] for meta in metas]
        held_out = sum(meta["held_out"] for meta in metas)
        seconds = sum(meta["wall_seconds"] for meta in metas) / len(metas)
        lines.append(
            f"{dataset:14s} {family:12s} {len(metas):3d} ({held_out} held out)  accuracy "
            f"{min(accuracies):.3f} / {sum(accuracies) / len(accuracies):.3f} / "
            f"{max(accuracies):.3f}  {seconds:.1f} s")
    return lines
