"""Which metanetwork serves which model: checkpoint scopes, discovery in a folder, the choice.

A checkpoint's JSON document records its scope: ``"scope": {"families": [...], "datasets":
[...], "universal": bool}`` — the zoo families and dataset ids it was meta-trained on, and
whether it is meant for any model (the universal checkpoint) or only for its families. No
machine path is ever stored (`portable_record` turns paths into their last component).

`choose_checkpoint` picks, for a model of family F on dataset D (either may be unknown):

1. a per-family checkpoint whose families hold F and whose datasets hold D;
2. a per-family checkpoint whose families hold F (trained on another dataset);
3. the universal checkpoint (the one with the widest scope if several);

and says why, in words, for the report's ``metanet`` entry (`select_metanet` does both for
`prune`, among `default_candidates`: the folder's default is its only universal candidate).
The family reaches `prune()` as `metaprune.zoo.family_of(module)`: models loaded from
``.safetensors`` + spec are zoo modules and carry it; a module lifted from a ``.pt2`` has no
family and gets the universal checkpoint. The dataset is known when `prune`'s ``data`` is a
dataset id; loaders or a folder leave it unknown (a per-family checkpoint still matches).

Example::

    checkpoints = discover_checkpoints("metaprune/checkpoints")
    chosen, reason = choose_checkpoint(checkpoints, family="cnn1d", dataset="mnist1d")
    chosen.name, reason     # ("metanet-cnn1d", "per-family checkpoint for cnn1d on mnist1d")
    chosen.describe()       # {"name": ..., "sha256": ..., "families": [...], ...}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from metaprune.errors import MetaPruneError, ModelFormatError


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint found in a folder, with its scope (read from its JSON document)."""

    name: str  # the file stem, e.g. "metanet" or "metanet-cnn1d"
    path: Path  # the .safetensors file (never reported: machine-specific)
    families: tuple[str, ...]  # zoo families it was trained on
    datasets: tuple[str, ...]  # dataset ids it was trained on
    universal: bool  # meant for any model, not only its families
    sha256: str  # of the weights file, so a report names exactly what ran

    def describe(self) -> dict:
        """JSON-serialisable description (no path): what a report or GetServerInfo shows."""
        return {"name": self.name, "sha256": self.sha256, "families": list(self.families),
                "datasets": list(self.datasets), "universal": self.universal}


def scope_of(document: dict) -> dict:
    """The scope recorded in a checkpoint document; older documents are universal, unscoped."""
    scope = document.get("scope")
    if scope is None:
        return {"families": [], "datasets": [], "universal": True}
    if not isinstance(scope, dict) or not all(
            isinstance(scope.get(key, []), list)
            and all(isinstance(item, str) for item in scope.get(key, []))
            for key in ("families", "datasets")):
        raise ModelFormatError("metanetwork config 'scope' must hold lists of family and "
                               "dataset ids")
    return {"families": list(scope.get("families", [])),
            "datasets": list(scope.get("datasets", [])),
            "universal": bool(scope.get("universal", not scope.get("families")))}


def portable_record(value):
    """`value` with every absolute path (a string starting with / or ~) cut to its last part.

    Checkpoints are shipped and served: they must not carry the paths of the machine that
    trained them.
    """
    if isinstance(value, dict):
        return {key: portable_record(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable_record(item) for item in value]
    if isinstance(value, str) and value.startswith(("/", "~")):
        return Path(value).name
    return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The `CheckpointInfo` of one ``.safetensors`` checkpoint (its JSON document beside it)."""
    path = Path(path)
    sibling = path.with_suffix(".json")
    try:
        document = json.loads(sibling.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"metanetwork checkpoint {path.name!r} has no readable JSON "
                               f"document beside it: {error}") from error
    if not isinstance(document, dict):
        raise ModelFormatError(f"{sibling.name!r} is not a metanetwork document")
    scope = scope_of(document)
    return CheckpointInfo(name=path.stem, path=path, families=tuple(scope["families"]),
                          datasets=tuple(scope["datasets"]), universal=scope["universal"],
                          sha256=_sha256(path))


def discover_checkpoints(folder: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint (``*.safetensors`` with its JSON document) in `folder`, sorted by name.

    Raises:
        ModelFormatError: a checkpoint's document is missing or malformed (a served folder
            should fail at start-up, not when a job asks for it).
    """
    paths = sorted(Path(folder).glob("*.safetensors"), key=lambda path: path.stem)
    return [checkpoint_info(path) for path in paths]


def default_candidates(folder: str | Path) -> list[CheckpointInfo]:
    """The checkpoints of `folder` that ``"default"`` may select: every per-family one, and of
    the universal ones only the folder's default (`metaprune.vocabulary.default_checkpoint`).

    Other universal checkpoints in the folder (e.g. ``fast``) are options
    by name only, so adding one never changes what ``"default"`` prunes with. A folder without
    a default file (no ``metanet*.safetensors``) offers all its checkpoints.
    """
    from metaprune.vocabulary.checkpoints import default_checkpoint

    if not Path(folder).is_dir():
        return []
    checkpoints = discover_checkpoints(folder)
    default = default_checkpoint(folder)
    if default is None:
        return checkpoints
    return [c for c in checkpoints if not c.universal or c.name == default.stem]


def choose_checkpoint(checkpoints: list[CheckpointInfo], *, family: str | None = None,
                      dataset: str | None = None) -> tuple[CheckpointInfo, str]:
    """The checkpoint for a model of `family` on `dataset`, and the reason, in words.

    Raises:
        MetaPruneError: no checkpoint fits (no per-family match and no universal checkpoint).
    """
    specific = [c for c in checkpoints if not c.universal and family in c.families]
    on_dataset = [c for c in specific if dataset in c.datasets]
    if on_dataset:
        chosen = min(on_dataset, key=lambda c: (len(c.families), c.name))
        return chosen, f"per-family checkpoint for {family} on {dataset}"
    if specific:
        chosen = min(specific, key=lambda c: (len(c.families), c.name))
        return chosen, (f"per-family checkpoint for {family} (trained on "
                        f"{', '.join(chosen.datasets) or 'unrecorded data'}; none for "
                        f"{dataset or 'this data'})")
    universal = [c for c in checkpoints if c.universal]
    if not universal:
        raise MetaPruneError(f"no metanetwork checkpoint covers family {family or 'unknown'} "
                             "and none is universal")
    chosen = max(universal, key=lambda c: (len(c.families), c.name))
    why = "the model is not a zoo family" if family is None else \
        f"no per-family checkpoint for {family}"
    return chosen, f"universal checkpoint ({why})"


def select_metanet(metanet, module, data=None, *, folder: str | Path | None = None):
    """What `prune(metanet=...)` should load for `module`, and the report's ``metanet`` entry.

    Args:
        metanet: ``"default"`` (choose among the checkpoints in `folder` by the model's zoo
            family and the dataset id), a checkpoint's name in `folder` (e.g. ``"fast"``), a
            checkpoint path, or a loaded object (used as given).
        module: the model to prune; its family is `metaprune.zoo.family_of(module)`.
        data: `prune`'s data argument; a dataset id names the dataset, anything else leaves it
            unknown.
        folder: where ``"default"`` looks (the package's committed checkpoints by default).

    Returns:
        ``(what to load, entry)``: a path or the object itself, and a JSON-serialisable dict
        (name, sha256, families, datasets, universal, reason) — None for an object.

    Example::

        chosen, entry = select_metanet("default", model, "mnist1d")
        entry["reason"]   # "per-family checkpoint for cnn1d on mnist1d"
    """
    from metaprune import zoo

    if metanet is None:
        return None, None
    if not isinstance(metanet, (str, Path)):
        return metanet, None
    if folder is None:
        from metaprune.pruning.metanet_bridge import CHECKPOINT_DIR

        folder = CHECKPOINT_DIR
    if metanet != "default":
        from metaprune.vocabulary.checkpoints import available_metanetworks

        named = available_metanetworks(folder).get(str(metanet))  # e.g. "fast"
        path = named or Path(metanet)
        if not path.is_file():
            return metanet, None  # the engine's loader reports the missing file
        how = "checkpoint given by name" if named else "checkpoint given by path"
        return path, {**checkpoint_info(path).describe(), "reason": how}
    checkpoints = default_candidates(folder)
    if not checkpoints:
        return metanet, None  # the engine's loader says no checkpoint is available
    family = zoo.family_of(module)
    dataset = data if isinstance(data, str) and not Path(data).exists() else None
    chosen, reason = choose_checkpoint(checkpoints, family=family, dataset=dataset)
    return chosen.path, {**chosen.describe(), "reason": reason}
