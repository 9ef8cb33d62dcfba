"""Policies (module name -> keep ratio) and the recipe documents `metaprune tune` writes.

A policy is accepted in every form a user meets it in, by every layer (library, CLI, client,
server, `tune`): a mapping, a recipe document holding the mapping under ``"policy"``, JSON text
of either, or a path to a JSON file of either. `parse_policy` turns any of them into a checked
``dict[str, float]``; `Recipe` reads and writes the whole recipe document.

Example::

    parse_policy({"conv1": 0.5})                                   # {'conv1': 0.5}
    parse_policy({"format": RECIPE_FORMAT, "policy": {"conv1": 0.5}, "speedup": 2.0})
    parse_policy("tune-out/recipe.json")                           # the file's policy
    policy_from_json('{"policy": {"conv1": 0.5}}')                 # {'conv1': 0.5}
"""

import json
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path

from metaprune.errors import InvalidTargetError
from metaprune.vocabulary.bounds import check_keep_ratio, check_speedup

RECIPE_FORMAT = "metaprune-tune-recipe/1"
MAX_POLICY_BYTES = 256 * 1024  # a policy of a few thousand layers; anything larger is refused
MAX_POLICY_ENTRIES = 65536


def _mapping_of(document) -> dict:
    """The policy mapping inside a plain policy or a recipe document."""
    if isinstance(document, dict) and isinstance(document.get("policy"), dict):
        return document["policy"]  # a recipe: a module's ratio is a number, never a mapping
    return document


def check_policy(document) -> dict[str, float]:
    """A checked policy from a mapping or a recipe document (already parsed from JSON)."""
    mapping = _mapping_of(document)
    if not isinstance(mapping, dict) or not mapping:
        raise InvalidTargetError("a policy must be a non-empty mapping: module name -> keep ratio "
                                 "(or a recipe from `metaprune tune` holding one under \"policy\")")
    if len(mapping) > MAX_POLICY_ENTRIES:
        raise InvalidTargetError(f"a policy may name at most {MAX_POLICY_ENTRIES} modules")
    return {str(name): check_keep_ratio(name, ratio) for name, ratio in mapping.items()}


def policy_from_json(text: str | bytes, source: str = "the policy") -> dict[str, float]:
    """A checked policy from JSON text (a plain policy or a recipe), at most MAX_POLICY_BYTES."""
    if len(text) > MAX_POLICY_BYTES:
        raise InvalidTargetError(f"{source} is over {MAX_POLICY_BYTES} bytes")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidTargetError(f"{source} is not valid JSON: {error}") from None
    return check_policy(document)


def read_json_document(path: str | PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InvalidTargetError(f"{what} file {str(path)!r} does not exist")
    if path.stat().st_size > MAX_POLICY_BYTES:
        raise InvalidTargetError(f"{what} file {str(path)!r} is over {MAX_POLICY_BYTES} bytes")
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as error:
        raise InvalidTargetError(f"{what} file {str(path)!r} is not valid JSON: {error}") from None


def parse_policy(policy) -> dict[str, float]:
    """A checked policy from a mapping, a recipe document, or a path to a JSON file of either."""
    if isinstance(policy, (str, PathLike)):
        policy = read_json_document(policy, "policy")
    return check_policy(policy)


def is_policy_file(value) -> bool:
    """Whether an `allocation` value names a policy file rather than an allocation id."""
    return isinstance(value, PathLike) or (isinstance(value, str) and value.endswith(".json"))


@dataclass
class Recipe:
    """The document `metaprune tune` writes: the best policy and how to apply it again.

    Example::

        recipe = Recipe.read("tune-out/recipe.json")
        recipe.policy, recipe.speedup          # ({'features.0.unit.conv': 0.83, ...}, 2.0)
        Recipe(policy={"conv1": 0.5}, speedup=2.0).to_dict()["format"]   # RECIPE_FORMAT
    """

    policy: dict  # module name -> keep ratio (the engine rescales it to `speedup`)
    speedup: float | None = None  # the target the policy was tuned for
    method: str = "l2"  # criterion the trials pruned with
    dataset: str | None = None  # dataset id the trials fine-tuned and evaluated on
    finetune_epochs: int = 0  # fine-tuning epochs of each trial
    model: str | None = None  # the tuned model file, as the user named it
    tuned: dict = field(default_factory=dict)  # the winning trial's figures (accuracy, MACs, ...)
    command: str | None = None  # the `metaprune prune` line that applies the recipe

    def __post_init__(self) -> None:
        self.policy = check_policy(self.policy)
        if self.speedup is not None:
            self.speedup = check_speedup(self.speedup)

    @classmethod
    def from_dict(cls, document: dict) -> "Recipe":
        if not isinstance(document, dict) or not isinstance(document.get("policy"), dict):
            raise InvalidTargetError("a recipe is a JSON object with a \"policy\" mapping")
        if document.get("format", RECIPE_FORMAT) != RECIPE_FORMAT:
            raise InvalidTargetError(f"recipe format {document.get('format')!r} is not "
                                     f"{RECIPE_FORMAT!r}")
        known = {name: document[name] for name in cls.__dataclass_fields__ if name in document}
        return cls(**known)

    @classmethod
    def read(cls, path: str | PathLike) -> "Recipe":
        return cls.from_dict(read_json_document(path, "recipe"))

    def to_dict(self) -> dict:
        return {"format": RECIPE_FORMAT, **asdict(self)}
