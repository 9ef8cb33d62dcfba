"""The shared vocabulary: one set of names and bounds, one policy/recipe parser, one request
(`PruneRequest`), read the same way by the library, the CLI, the client, the server and `tune`.
Torch-free, so the server process can import it."""

import json
import subprocess
import sys

import pytest

from metaprune.errors import InvalidTargetError, MissingDataError
from metaprune.vocabulary import (
    CRITERIA,
    DATASETS,
    RECIPE_FORMAT,
    PruneRequest,
    Recipe,
    parse_policy,
    policy_from_json,
)

RECIPE = {"format": RECIPE_FORMAT, "policy": {"conv1": 0.5, "conv2": 0.8}, "speedup": 2.0,
          "method": "l2", "dataset": "mnist1d", "finetune_epochs": 1, "model": "m.pt2",
          "tuned": {"accuracy": 0.8}, "command": "metaprune prune ..."}


def test_the_vocabulary_imports_without_torch():
    code = ("import sys, metaprune.vocabulary, metaprune.serving.limits; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_library_and_service_share_one_list_of_names():
    from metaprune.criteria import CRITERIA as implemented
    from metaprune.data import DATASET_IDS
    from metaprune.serving import limits

    assert implemented == CRITERIA and DATASET_IDS == DATASETS
    assert limits.CRITERIA is CRITERIA and limits.DATASETS is DATASETS


@pytest.mark.parametrize("options, message", [
    ({"speedup": 1.0}, "above 1"),
    ({"speedup": float("nan")}, "finite"),
    ({"speedup": True}, "number"),
    ({"params_ratio": 1.0}, r"\(0, 1\)"),
    ({"params_ratio": 0.0}, r"\(0, 1\)"),
    ({"latency_speedup": 0.9}, "latency_speedup must be a number above 1"),
    ({"speedup": 2.0, "latency_speedup": 2.0}, "at most one target"),
    ({"speedup": 2.0, "latency_batch": 0}, "latency_batch"),
    ({"speedup": 2.0, "round_to": 0}, "round_to"),
    ({"speedup": 2.0, "round_to": "often"}, "round_to"),
    ({"speedup": 2.0, "latency": "no"}, "true or false"),
    ({"speedup": 2.0, "exclude": [""]}, "not a module name"),
    ({"speedup": 2.0, "criterion": "l3"}, "valid criteria"),
    ({"speedup": 2.0, "finetune": {"optimizer": "lion"}}, "valid optimizers"),
    ({"policy": {"conv1": 1.5}}, r"\(0, 1\]"),
    ({"speedup": 2.0, "colour": "red"}, "unknown pruning option"),
])
def test_request_bounds(options, message):
    with pytest.raises(InvalidTargetError, match=message):
        PruneRequest.from_options(options)


def test_request_resolves_what_the_method_implies_and_round_trips():
    request = PruneRequest(method="metanet", speedup=2, data="mnist1d", exclude="fc",
                           round_to="8")
    assert (request.resolved_criterion, request.resolved_allocation, request.resolved_metanet) \
        == ("l2", "metanet", "default")
    assert request.target == ("speedup", 2.0) and request.round_to == 8
    assert PruneRequest.from_options(request.to_options()) == request
    with pytest.raises(MissingDataError, match="needs data"):
        PruneRequest(method="metanet", speedup=2.0)
    with pytest.raises(MissingDataError, match="taylor.*needs data"):
        PruneRequest(criterion="taylor", speedup=2.0)


def test_a_recipe_is_a_policy_in_every_form(tmp_path):
    """Issue #15 item 2: the recipe `metaprune tune` writes works wherever a policy does."""
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(RECIPE))
    plain = RECIPE["policy"]
    assert parse_policy(RECIPE) == parse_policy(path) == parse_policy(str(path)) == plain
    assert policy_from_json(json.dumps(RECIPE)) == policy_from_json(json.dumps(plain)) == plain
    assert PruneRequest(policy=str(path), speedup=2.0).policy == plain
    assert PruneRequest(allocation=str(path)).policy == plain  # a policy file as allocation
    assert Recipe.read(path).to_dict() == RECIPE
    with pytest.raises(InvalidTargetError, match="non-empty"):
        parse_policy({"policy": {}, "speedup": 2.0})


def test_the_service_and_the_client_accept_a_recipe(tmp_path):
    """Before: the server answered INVALID_ARGUMENT "the policy's keep ratio for 'policy' must
    be a number in (0, 1]" for the recipe file that works in-process."""
    from metaprune.serving.client import _submit_arguments
    from metaprune.serving.job_request import RequestError, _policy

    assert _policy(json.dumps(RECIPE)) == RECIPE["policy"]
    with pytest.raises(RequestError) as refused:
        _policy(json.dumps({"conv1": 2.0}))
    assert refused.value.code == "INVALID_ARGUMENT"
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(RECIPE))
    submit = _submit_arguments(PruneRequest(policy=str(path), speedup=2.0), client=None)
    assert submit["policy"] == RECIPE["policy"] and submit["speedup"] == 2.0
