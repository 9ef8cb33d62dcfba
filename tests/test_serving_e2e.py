"""End to end through a real server process: upload, prune in a worker, watch, download.

Also: uploaded data for fine-tuning, cancelling, the queue limit and the job time limit."""

import json
import time

import pytest
import torch

from metaprune.formats import load_model
from metaprune.measure import count_macs
from metaprune.serving import pruning_pb2 as pb
from metaprune.serving.client import PruningClient, prune_remote, status_of
from metaprune.serving.process import ServerProcess
from metaprune.serving.samples import write_model, write_npz

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("e2e") / "state"
    with ServerProcess(state, args=("--workers", "1", "--max-queued-jobs", "3")) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with PruningClient(server.address, timeout=120) as connection:
        yield connection


def _outputs(path, inputs):
    model, _ = load_model(path)
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("suffix", [".pt2", ".safetensors"])
def test_prune_round_trip(server, tmp_path, suffix):
    original = write_model(tmp_path / f"model{suffix}", seed=1)
    pruned = tmp_path / f"pruned{suffix}"
    report = prune_remote(server.address, original, pruned, options={"method": "l2", "speedup": 2.0},
                          report_path=tmp_path / "report.json", progress=False)
    assert pruned.exists() and json.loads((tmp_path / "report.json").read_text()) == report
    if suffix == ".safetensors":
        assert json.loads(pruned.with_suffix(".json").read_text())["family"] == "cnn1d"
    before, inputs = load_model(original)
    after, _ = load_model(pruned)
    assert count_macs(after, inputs) < count_macs(before, inputs)
    assert abs(report["flops_before"] / report["flops_after"] / 2.0 - 1) <= 0.02
    with torch.no_grad():
        assert after(*inputs).shape == before(*inputs).shape


def test_watch_events_and_listing(client, tmp_path):
    model = client.upload_model(write_model(tmp_path / "m.pt2"))
    assert model.num_parameters > 0 and list(model.input_shape)[1:] == [1, 40]
    job = client.submit(model.id, method="l1", params_ratio=0.5)
    events = []
    final = client.wait(job.job_id, on_event=events.append, timeout=120)
    assert pb.JobState.Name(final.state) == "SUCCEEDED", final.message
    states = [pb.JobState.Name(e.state) for e in events if e.kind == "state"]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]
    # issue 12: phase events said JOB_STATE_UNSPECIFIED; every event carries the job's state
    assert {pb.JobState.Name(e.state) for e in events if e.kind != "state"} == {"RUNNING"}
    assert {"loading", "pruning", "saving"} <= {e.phase for e in events if e.kind == "phase"}
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert job.job_id in [j.job_id for j in client.list_jobs(state="SUCCEEDED")]
    report = client.download(job.job_id, tmp_path / "out.pt2")
    assert report == json.loads(final.report_json)
    assert abs(report["params_after"] / report["params_before"] / 0.5 - 1) <= 0.02


def test_finetune_on_uploaded_data(client, tmp_path):
    report = prune_remote(
        client.target, write_model(tmp_path / "m.pt2"), tmp_path / "p.pt2", progress=False,
        options={"speedup": 2.0, "data": str(write_npz(tmp_path / "d.npz")), "finetune_epochs": 1},
    )
    assert report["finetune"] is not None and 0.0 <= report["accuracy_after"] <= 1.0


def _wait_for_state(client, job_id, state, seconds=60):
    deadline = time.monotonic() + seconds
    while pb.JobState.Name(client.get_job(job_id).state) != state:
        assert time.monotonic() < deadline, f"{job_id} never reached {state}"
        time.sleep(0.1)


def test_cancel_and_queue_limit(client, tmp_path):
    model_id = client.upload_model(write_model(tmp_path / "m.pt2")).id
    long = dict(speedup=2.0, dataset="mnist1d", finetune_epochs=500)
    running = client.submit(model_id, **long)
    queued = [client.submit(model_id, **long) for _ in range(2)]
    with PruningClient(client.target, patience=0) as impatient:  # no waiting for `retry-after`
        assert status_of(lambda: impatient.submit(model_id, **long)) == "RESOURCE_EXHAUSTED"  # 3 max
    _wait_for_state(client, running.job_id, "RUNNING")
    for job in [*queued, running]:
        assert pb.JobState.Name(client.cancel(job.job_id).state) == "CANCELLED"
    assert status_of(lambda: client.download(running.job_id, tmp_path / "x.pt2")) == "FAILED_PRECONDITION"
    # the worker was stopped: the next job runs at once and succeeds
    job = client.wait(client.submit(model_id, speedup=2.0).job_id, timeout=120)
    assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
    assert pb.JobState.Name(client.get_job(running.job_id).state) == "CANCELLED"


def test_worker_time_limit_kills_the_process(tmp_path):
    # a cold worker (no preload) needs seconds to import torch: far past a 0.5 s limit
    import threading

    from metaprune.serving.local_backend import LocalBackend
    from metaprune.serving.worker import TaskFailure

    backend = LocalBackend(memory_bytes=4 << 30, warm=False)
    task = {"kind": "validate_model", "model_path": str(write_model(tmp_path / "m.pt2")),
            "max_parameters": 10**6}
    began = time.monotonic()
    with pytest.raises(TaskFailure) as failure:
        backend.run(task, on_event=lambda event: None, timeout=0.5, cancelled=threading.Event())
    assert failure.value.code == "RESOURCE_EXHAUSTED" and "time limit" in failure.value.message
    assert time.monotonic() - began < 30


def test_cli_prune_through_the_server(server, tmp_path, capsys):
    from metaprune.cli.main import main

    model = write_model(tmp_path / "m.pt2")
    code = main(["prune", str(model), "--out", str(tmp_path / "p.pt2"), "--speedup", "2",
                 "--server", server.address, "--report", str(tmp_path / "r.json")])
    assert code == 0 and (tmp_path / "p.pt2").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert abs(report["flops_before"] / report["flops_after"] / 2.0 - 1) <= 0.02
    # a refused request is a clear message and exit code 2, not a traceback; the request is
    # checked by the same vocabulary as in-process, before anything is uploaded
    code = main(["prune", str(model), "--out", str(tmp_path / "q.pt2"), "--speedup", "2",
                 "--criterion", "taylor", "--server", server.address])
    assert code == 2 and "needs data" in capsys.readouterr().err


def test_onnx_output(server, tmp_path):
    import onnx

    report = prune_remote(server.address, write_model(tmp_path / "m.pt2"), tmp_path / "p.onnx",
                          options={"speedup": 2.0}, progress=False)
    onnx.checker.check_model(onnx.load(tmp_path / "p.onnx"))
    assert report["flops_after"] < report["flops_before"]


def test_metanet_method_needs_a_checkpoint_and_data(client, tmp_path):
    model_id = client.upload_model(write_model(tmp_path / "m.pt2")).id
    assert status_of(lambda: client.submit(model_id, method="metanet", speedup=2.0)) == "FAILED_PRECONDITION"
    if not client.info().metanetworks:  # no checkpoint committed: refused up front
        code = status_of(lambda: client.submit(model_id, method="metanet", speedup=2.0, dataset="mnist1d"))
        assert code == "FAILED_PRECONDITION"
        return
    # the committed metanetwork, in a worker; its rewrite is off (head-only), so the whole
    # fine-tune budget follows pruning
    job = client.submit(model_id, method="metanet", speedup=2.0, dataset="mnist1d", finetune_epochs=2)
    job = client.wait(job.job_id, timeout=300)
    assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
    report = json.loads(job.report_json)
    assert report["method"] == "metanet" and abs(report["speedup"] / 2.0 - 1) <= 0.02
    spent = report["finetune"]
    assert (spent["epochs_after_metanet"], spent["epochs_after_prune"]) == (0, 2)

def test_request_checked_against_the_model_at_submit(client, tmp_path):
    # issue 12: `speedup: 1000` and a policy naming an unknown module were accepted at submit
    # and failed later in the worker; the upload's validation now records what they need
    from metaprune.serving.client import RemoteError

    model_id = client.upload_model(write_model(tmp_path / "m.pt2")).id
    for options, words in ((dict(speedup=1000.0), "speedup 1000 is out of reach"),
                           (dict(params_ratio=0.001), "params_ratio 0.001 is out of reach"),
                           (dict(policy={"features.9.conv": 0.5}), "policy names module 'features.9.conv'")):
        with pytest.raises(RemoteError) as refused:
            client.submit(model_id, **options)
        assert refused.value.code == "INVALID_ARGUMENT" and words in str(refused.value)
    accepted = client.submit(model_id, policy={"features.0.unit.conv": 0.5})
    assert pb.JobState.Name(client.wait(accepted.job_id, timeout=120).state) == "SUCCEEDED"


def test_options_of_the_second_wave_pass_through(client, tmp_path):
    # exclude, latency and latency_batch travel in SubmitJobRequest to `prune` (DESIGN §6)
    model_id = client.upload_model(write_model(tmp_path / "m.pt2")).id
    job = client.submit(model_id, speedup=1.5, extra={"exclude": ["features.0"], "latency": False,
                                                      "latency_batch": 4})
    job = client.wait(job.job_id, timeout=120)
    assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
    report = json.loads(job.report_json)
    assert report["kept"]["features.0.unit.conv"][0] == report["kept"]["features.0.unit.conv"][1]
    assert report["latency_ms_before"] is None and report["latency_ms_after"] is None
    assert list(job.request.exclude) == ["features.0"] and job.request.latency_batch == 4
    code = status_of(lambda: client.submit(model_id, speedup=2.0, extra={"exclude": ["nope"]}))
    assert code == "INVALID_ARGUMENT"


def test_metanet_dir_is_described(tmp_path):
    import hashlib
    import shutil

    from metaprune.vocabulary import CHECKPOINT_DIR

    folder = tmp_path / "metanets"
    folder.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(CHECKPOINT_DIR / f"metanet{suffix}", folder / f"metanet-copy{suffix}")
    with ServerProcess(tmp_path / "state", args=("--metanet-dir", str(folder))) as server, \
            PruningClient(server.address, timeout=120) as client:
        info = client.info()
        assert set(info.metanetworks) == {"default", "metanet-copy"}
        [described] = info.metanet_info
        assert described.name == "metanet-copy" and "cnn1d" in described.families
        assert described.sha256 == hashlib.sha256((folder / "metanet-copy.safetensors").read_bytes()).hexdigest()
        # "default" chooses among the folder's checkpoints, and the report says which and why
        model_id = client.upload_model(write_model(tmp_path / "m.safetensors")).id
        job = client.wait(client.submit(model_id, method="metanet", speedup=2.0, dataset="mnist1d",
                                        finetune_epochs=1).job_id, timeout=300)
        assert pb.JobState.Name(job.state) == "SUCCEEDED", job.message
        entry = json.loads(job.report_json)["metanet"]
        assert entry["name"] == "metanet-copy" and entry["sha256"] == described.sha256
        assert "universal" in entry["reason"]


def test_a_tune_recipe_prunes_through_the_server(server, tmp_path):
    """Issue #15 item 2: the recipe `metaprune tune` writes, given to `metaprune prune --policy
    ... --server`. Before: INVALID_ARGUMENT "the policy's keep ratio for 'policy' must be a
    number in (0, 1]", while the same file worked in-process."""
    from torch import nn

    from metaprune.cli.main import main
    from metaprune.vocabulary import Recipe

    model_path = write_model(tmp_path / "m.pt2", seed=2)
    model, _ = load_model(model_path)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv1d)]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(Recipe(policy={name: 0.6 for name in convs},
                                        speedup=2.0).to_dict()))
    code = main(["prune", str(model_path), "--out", str(tmp_path / "p.pt2"), "--policy",
                 str(recipe), "--speedup", "2", "--server", server.address,
                 "--report", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["allocation"] == "policy" and abs(report["speedup"] / 2.0 - 1) <= 0.02
