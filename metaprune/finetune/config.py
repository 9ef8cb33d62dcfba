"""How fine-tuning runs: optimiser, learning-rate schedule, distillation, BN recalibration."""

from dataclasses import asdict, dataclass, fields
from numbers import Real

from metaprune.errors import InvalidTargetError
from metaprune.vocabulary import OPTIMIZERS, SCHEDULES
# Defaults that suit fine-tuning a pruned network (and training the small zoo models from
# scratch): SGD with momentum at 0.01, AdamW at 1e-3 with its usual decoupled decay.
DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 1e-2}


@dataclass
class FinetuneConfig:
    """Settings of :func:`metaprune.finetune.train`; every field has a working default.

    Example::

        config = FinetuneConfig.from_dict({"optimizer": "adamw", "schedule": "cosine",
                                           "distill": True})
        config.learning_rate()               # 0.001, the AdamW default
    """

    optimizer: str = "sgd"  # "sgd" (with momentum, Nesterov) or "adamw"
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    momentum: float = 0.9  # SGD only
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY[optimizer]
    schedule: str = "cosine"  # per-step cosine to 0, "step" (x0.1 at 50 % and 75 %), "constant"
    distill: bool = False  # learn from the teacher's soft labels when train() gets a teacher
    distill_temperature: float = 4.0  # softens both distributions; the KL term is scaled by T^2
    distill_alpha: float = 0.5  # weight of the distillation term; 1 - alpha weighs cross-entropy
    bn_recalibration: bool = True  # re-estimate BatchNorm statistics after the last epoch
    seed: int = 0  # seeds torch/NumPy/Python before training
    # With a metanetwork, `prune` may split its fine-tune budget: this many epochs right after
    # the weight rewrite (None: 0, measured better), the rest after pruning. `train` ignores it.
    metanet_epochs: int | None = None

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("distill", "bn_recalibration"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidTargetError(f"finetune {name} must be true or false")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InvalidTargetError(f"finetune seed must be an integer, got {self.seed!r}")
        if self.metanet_epochs is not None and (
                not isinstance(self.metanet_epochs, int) or isinstance(self.metanet_epochs, bool)
                or self.metanet_epochs < 0):
            raise InvalidTargetError(
                f"finetune metanet_epochs must be a whole number >= 0, got {self.metanet_epochs!r}")
        _check_number("lr", self.lr, low=0.0, low_open=True, optional=True)
        _check_number("weight_decay", self.weight_decay, low=0.0, optional=True)
        _check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _check_number("distill_temperature", self.distill_temperature, low=0.0, low_open=True)
        _check_number("distill_alpha", self.distill_alpha, low=0.0, high=1.0)

    @classmethod
    def from_dict(cls, values: dict | None) -> "FinetuneConfig":
        """Build from a JSON-like dict (``None`` gives the defaults); unknown keys are errors."""
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise InvalidTargetError(
                f"finetune settings must be a dict, got {type(values).__name__}"
            )
        known = [field.name for field in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidTargetError(
                f"unknown finetune setting(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(known)}"
            )
        return cls(**values)

    def to_dict(self) -> dict:
        """The settings as a JSON-serialisable dict (defaults left as None)."""
        return asdict(self)

    def learning_rate(self) -> float:
        """``lr``, or the optimiser's default when ``lr`` is None."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)

    def decay(self) -> float:
        """``weight_decay``, or the optimiser's default when it is None."""
        return DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else float(
            self.weight_decay
        )


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidTargetError(
            f"finetune {name} must be one of {', '.join(choices)}; got {value!r}"
        )


def _check_number(
    name: str, value, *, low: float, high: float = float("inf"), low_open: bool = False,
    high_open: bool = False, optional: bool = False,
) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Real) or isinstance(value, bool):
        raise InvalidTargetError(f"finetune {name} must be a number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise InvalidTargetError(f"finetune {name} must lie in {interval}, got {value}")
