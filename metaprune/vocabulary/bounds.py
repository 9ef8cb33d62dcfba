"""Range checks of a request's numbers and names; each returns the value in its canonical type.

Bounds (DESIGN §6): `speedup` and `latency_speedup` > 1, `params_ratio` in (0, 1), a policy's
keep ratios in (0, 1], `latency_batch` a whole number in [1, MAX_LATENCY_BATCH], `round_to` a
whole number in [1, MAX_ROUND_TO] or "auto". Every failure is an `InvalidTargetError` whose
message names the option, the bound and the value.

Example::

    check_speedup(2)            # 2.0
    check_params_ratio(1.0)     # InvalidTargetError: params_ratio must be in (0, 1) ...
"""

import math
from collections.abc import Iterable

from metaprune.errors import InvalidTargetError
from metaprune.vocabulary.names import ROUND_TO_AUTO

TOLERANCE = 0.02  # a target is met when |achieved / target - 1| <= this (DESIGN §5)
MAX_LATENCY_BATCH = 4096  # a latency measurement bigger than this is a typo, not a wish
MAX_ROUND_TO = 1024  # no layer's width is rounded to a coarser multiple than this
MAX_NAME_CHARS = 512  # a module name longer than this is not a module name
MAX_EXCLUDED = 4096


def number(name: str, value) -> float:
    """A finite float (bool is not a number here)."""
    if isinstance(value, bool):
        raise InvalidTargetError(f"{name} must be a number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError) as error:
        raise InvalidTargetError(f"{name} must be a number, got {value!r}") from error
    if not math.isfinite(result):
        raise InvalidTargetError(f"{name} must be finite, got {value!r}")
    return result


def whole_number(name: str, value, low: int, high: int | None = None) -> int:
    """An int in [low, high] (a float with no fraction is accepted; bool is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not value.is_integer()):
        raise InvalidTargetError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidTargetError(f"{name} must be {bound}, got {value}")
    return value


def check_speedup(value, name: str = "speedup") -> float:
    """MACs (or, for `latency_speedup`, latency) before / after: a number above 1."""
    result = number(name, value)
    if result <= 1.0:
        raise InvalidTargetError(
            f"{name} must be a number above 1 (before / after), got {result:g}")
    return result


def check_params_ratio(value) -> float:
    """Params after / params before: a number in (0, 1)."""
    result = number("params_ratio", value)
    if not 0.0 < result < 1.0:
        raise InvalidTargetError(
            f"params_ratio must be in (0, 1) (params after / params before), got {result:g}")
    return result


def check_keep_ratio(module: str, value) -> float:
    """One policy entry: a module's keep ratio in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0.0 < float(value) <= 1.0:
        raise InvalidTargetError(
            f"the policy's keep ratio of {str(module)[:80]!r} must be a number in (0, 1], "
            f"got {value!r}")
    return float(value)


def check_latency_batch(value) -> int:
    return whole_number("latency_batch", value, 1, MAX_LATENCY_BATCH)


def check_round_to(value) -> int | str | None:
    """None (no rounding), "auto", or a whole number of channels in [1, MAX_ROUND_TO]."""
    if value is None or value == ROUND_TO_AUTO:
        return value
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise InvalidTargetError(
                f"round_to must be a whole number or {ROUND_TO_AUTO!r}, got {value!r}") from None
    return whole_number("round_to", value, 1, MAX_ROUND_TO)


def check_finetune_epochs(value) -> int:
    return whole_number("finetune_epochs", 0 if value is None else value, 0)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidTargetError(f"{name} must be true or false, got {value!r}")
    return value


def check_module_names(name: str, values) -> tuple[str, ...]:
    """A tuple of module names from one name or an iterable of names (duplicates dropped)."""
    if isinstance(values, str):
        values = (values,)
    if not isinstance(values, Iterable):
        raise InvalidTargetError(f"{name} must be a list of module names, got {values!r}")
    names = []
    for value in values:
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
            raise InvalidTargetError(
                f"{name} holds {str(value)[:80]!r}, which is not a module name")
        if value not in names:
            names.append(value)
        if len(names) > MAX_EXCLUDED:
            raise InvalidTargetError(f"{name} names more than {MAX_EXCLUDED} modules")
    return tuple(names)


def check_choice(what: str, value, allowed: tuple[str, ...], plural: str | None = None) -> str:
    """`value` if it is one of `allowed`; else an error naming the valid ones."""
    if not isinstance(value, str) or value not in allowed:
        shown = str(value)[:80]
        raise InvalidTargetError(
            f"unknown {what} {shown!r}; valid {plural or what + 's'}: {', '.join(allowed)}")
    return value
