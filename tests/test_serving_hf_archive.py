"""HuggingFace folders through the service: uploaded as an uncompressed tar of the folder,
checked entry by entry (no pickles, no code, no links, no paths out of the folder, size
limits), pruned, and downloaded back as a folder that ``from_pretrained`` reads."""

import io
import json
import tarfile

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import tiny_llama_folder  # noqa: E402

from metaprune import load_model  # noqa: E402
from metaprune.errors import ModelFormatError  # noqa: E402
from metaprune.formats.hf_archive import extract_hf_archive, write_hf_archive  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("hf") / "llama")


def _tar(path, entries) -> bytes:
    """An archive of (name, bytes | TarInfo-editing function) entries."""
    with tarfile.open(path, "w") as tar:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            if callable(payload):
                payload(info)
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path.read_bytes()


def _good_entries(folder):
    return [(name, (folder / name).read_bytes()) for name in ("config.json", "model.safetensors")]


def _symlink(info):
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"


HOSTILE = {
    "traversal": lambda good: good + [("../escape.json", b"{}")],
    "absolute": lambda good: good + [("/tmp/config.json", b"{}")],
    "symlink": lambda good: [good[1], ("config.json", _symlink)],
    "pickle": lambda good: good + [("pytorch_model.bin", b"\x80\x04K\x01.")],
    "code": lambda good: good + [("modeling_evil.py", b"import os")],
    "duplicate": lambda good: good + [good[0]],
    "two folders": lambda good: [("a/" + good[0][0], good[0][1]), ("b/" + good[1][0], good[1][1])],
    "no weights": lambda good: good[:1],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_leave_nothing(llama_folder, tmp_path, case):
    archive = tmp_path / "m.tar"
    _tar(archive, HOSTILE[case](_good_entries(llama_folder)))
    with pytest.raises(ModelFormatError):
        extract_hf_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape.json").exists()


def test_compressed_oversized_and_remote_code_archives_are_refused(llama_folder, tmp_path):
    with tarfile.open(tmp_path / "m.tar.gz", "w:gz") as tar:
        tar.add(llama_folder / "config.json", arcname="config.json")
    with pytest.raises(ModelFormatError, match="uncompressed"):
        extract_hf_archive(tmp_path / "m.tar.gz", tmp_path / "out")
    write_hf_archive(llama_folder, tmp_path / "m.tar")
    with pytest.raises(ModelFormatError, match="more than 1000 bytes"):
        extract_hf_archive(tmp_path / "m.tar", tmp_path / "out", max_bytes=1000)
    config = json.loads((llama_folder / "config.json").read_text())
    good = _good_entries(llama_folder)
    _tar(tmp_path / "remote.tar", [("llama/config.json", json.dumps(
        {**config, "auto_map": {"AutoModel": "evil.Model"}}).encode()),
        ("llama/model.safetensors", good[1][1])])
    folder = extract_hf_archive(tmp_path / "remote.tar", tmp_path / "remote")  # names are fine
    with pytest.raises(ModelFormatError, match="remote code"):
        load_model(folder)  # the loader refuses it
    with pytest.raises(ModelFormatError, match="more than the limit 10"):
        load_model(llama_folder, max_params=10)  # counted from the safetensors header


@pytest.mark.slow  # a server process and a pruning job
def test_folder_uploaded_pruned_and_downloaded_through_the_service(llama_folder, tmp_path):
    from metaprune.serving import pruning_pb2 as pb
    from metaprune.serving.client import PruningClient, status_of
    from metaprune.serving.process import ServerProcess

    with ServerProcess(tmp_path / "state", args=("--max-upload-mb", "4")) as server, \
            PruningClient(server.address, timeout=120) as client:
        reply = client.upload_model(llama_folder)
        assert reply.num_parameters == sum(
            p.numel() for p in load_model(llama_folder)[0].parameters())
        for case in ("traversal", "pickle", "symlink"):
            archive = tmp_path / f"{case}.tar"
            _tar(archive, HOSTILE[case](_good_entries(llama_folder)))
            assert status_of(lambda: client.upload_model(archive)) == "INVALID_ARGUMENT"
        # the refusals lost nothing: the good upload prunes, and comes back as a folder
        job = client.submit(reply.id, speedup=2.0, allocation="uniform",
                            extra={"latency": False})
        job = client.wait(job.job_id)
        assert job.state == pb.SUCCEEDED, job.message
        report = client.download(job.job_id, tmp_path / "pruned")
    assert abs(report["speedup"] / 2 - 1) <= 0.02 and report["save_pretrained"]["possible"]
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "pruned", local_files_only=True, trust_remote_code=False)
    assert direct.config.intermediate_size < 64
