"""A HuggingFace model folder as one file: an uncompressed tar of ``config.json`` + safetensors.

This is how a folder travels to and from the service (an upload is one file). Reading an
archive trusts nothing in it, as the `.pt2` intake does:

- only an uncompressed tar (no decompression bomb), at most `MAX_MEMBERS` entries;
- only regular files (no links, devices or FIFOs) under names from a fixed list —
  ``config.json``, ``generation_config.json``, ``model.safetensors``, the shards
  ``model-00001-of-00002.safetensors`` and their ``model.safetensors.index.json`` — optionally
  inside one top-level folder; any other name (a pickled ``pytorch_model.bin``, a
  ``modeling_*.py`` of remote code, ``../x``, an absolute path) is refused, and so are
  duplicates;
- entry sizes add up to at most ``max_bytes``; JSON files at most `MAX_JSON_BYTES`;
- files are written by this code under the destination (never ``tarfile.extractall``), and
  the folder is then read by `load_hf_folder` (safetensors only, ``trust_remote_code=False``,
  parameters counted from the safetensors headers before any tensor is allocated).

Example::

    write_hf_archive("tiny-llama/", "tiny-llama.tar")
    folder = extract_hf_archive("tiny-llama.tar", "unpacked/")   # or ModelFormatError saying why
    model, example_inputs = load_hf_folder(folder)
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path

from metaprune.errors import ModelFormatError

MAX_MEMBERS = 64
MAX_JSON_BYTES = 1 << 20
_NAMES = re.compile(r"config\.json|generation_config\.json|model\.safetensors"
                    r"|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json")
_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5", ".msgpack")


def write_hf_archive(folder: str | os.PathLike, archive: str | os.PathLike) -> Path:
    """The archive of a ``save_pretrained`` folder: its allowed files only, flat, sorted."""
    folder, archive = Path(folder), Path(archive)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and _NAMES.fullmatch(p.name))
    if "config.json" not in names:
        raise ModelFormatError(f"{folder} holds no config.json")
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            tar.add(folder / name, arcname=name, recursive=False)
    return archive


def _entry_name(raw: str) -> str:
    """The file name of an entry: ``NAME`` or ``FOLDER/NAME``; anything else is refused."""
    parts = raw.split("/")
    if raw.startswith("/") or "\\" in raw or any(p in ("", ".", "..") for p in parts) \
            or len(parts) > 2 or len(raw) > 255:
        raise ModelFormatError(f"archive entry {raw[:80]!r} is not a plain file name (only "
                               "NAME or FOLDER/NAME, no absolute or parent paths)")
    return parts[-1]


def extract_hf_archive(archive: str | os.PathLike, destination: str | os.PathLike, *,
                       max_bytes: int = 512 << 20) -> Path:
    """Checks every entry of `archive`, then writes the files into the new folder
    `destination` (which must not exist); returns it. Raises ModelFormatError saying which
    entry and why, leaving nothing behind.

    Args:
        archive: an uncompressed tar of one model folder.
        destination: the folder to create.
        max_bytes: most bytes all entries may hold together.
    """
    destination = Path(destination)
    try:
        tar = tarfile.open(archive, mode="r:")  # "r:": uncompressed only
    except (tarfile.TarError, OSError) as error:
        raise ModelFormatError(f"not an uncompressed tar archive ({error})") from None
    with tar:
        entries = _checked_entries(tar, max_bytes)
        destination.mkdir()
        try:
            for member, name in entries:
                with tar.extractfile(member) as source, open(destination / name, "xb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                    if sink.tell() != member.size:
                        raise ModelFormatError(f"archive entry {member.name[:80]!r} is "
                                               "truncated")
        except (tarfile.TarError, EOFError) as error:
            shutil.rmtree(destination, ignore_errors=True)
            raise ModelFormatError(f"the archive is damaged ({error})") from None
        except BaseException:
            shutil.rmtree(destination, ignore_errors=True)
            raise
    return destination


def _checked_entries(tar: tarfile.TarFile, max_bytes: int) -> list:
    entries, seen, total, top = [], set(), 0, None
    try:
        for count, member in enumerate(tar, start=1):
            if count > MAX_MEMBERS:
                raise ModelFormatError(f"the archive has more than {MAX_MEMBERS} entries")
            folder = member.name.split("/")[0] if "/" in member.name.strip("/") else None
            if member.isdir():
                _entry_name(member.name.rstrip("/") + "/x")  # checks the folder's name
                continue
            if not member.isreg():
                raise ModelFormatError(f"archive entry {member.name[:80]!r} is not a regular "
                                       "file (links and devices are refused)")
            name = _entry_name(member.name)
            if top is not None and folder != top:
                raise ModelFormatError("the archive holds more than one folder")
            top = folder
            if not _NAMES.fullmatch(name):
                why = "pickled weights are never read; use safetensors" \
                    if name.endswith(_PICKLES) else "only config.json, generation_config.json " \
                    "and model*.safetensors (+ its index) are accepted; no code, no pickles"
                raise ModelFormatError(f"archive entry {name[:80]!r} refused: {why}")
            if name in seen:
                raise ModelFormatError(f"archive entry {name!r} appears twice")
            seen.add(name)
            if name.endswith(".json") and member.size > MAX_JSON_BYTES:
                raise ModelFormatError(f"{name} has {member.size} bytes, more than "
                                       f"{MAX_JSON_BYTES}")
            total += member.size
            if total > max_bytes:
                raise ModelFormatError(f"the archive's files hold more than {max_bytes} bytes")
            entries.append((member, name))
    except tarfile.TarError as error:
        raise ModelFormatError(f"the archive is damaged ({error})") from None
    if "config.json" not in seen or not any(n.endswith(".safetensors") for n in seen):
        raise ModelFormatError("the archive must hold config.json and safetensors weights")
    return entries
