"""Alignment methods, one file per method family."""

from __future__ import annotations

import dataclasses
import typing

from ttalign.hooks import AlignmentMethod

from .attention import AttendAndExcite, RegionReweight, TokenReweight
from .guidance import ParticleSteering, RewardGuidance
from .noise import NoiseOptimization, SeedSearch
from .prompt import Promptist, PromptRewrite
from .search import BestOfN
from .trace import PreviewX0, TraceLatents

#: Methods that can be named on the command line (`--align NAME[:key=value,...]`).
METHODS: dict[str, type[AlignmentMethod]] = {
    "best_of_n": BestOfN,
    "trace_latents": TraceLatents,
    "seed_search": SeedSearch,
    "noise_optimization": NoiseOptimization,
    "reward_guidance": RewardGuidance,
    "particle_steering": ParticleSteering,
    "attend_and_excite": AttendAndExcite,
    "token_reweight": TokenReweight,
    "region_reweight": RegionReweight,
    "prompt_rewrite": PromptRewrite,
    "promptist": Promptist,
}


def _load_reward(method: str, key: str, raw: str, rewards: dict | None):
    from ttalign.rewards import load_reward

    if rewards is not None and raw in rewards:
        return rewards[raw]
    try:
        reward = load_reward(raw)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - a checkpoint that cannot be loaded here is a bad option value
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"Option {key!r} of method {method!r}: cannot load reward {raw!r} ({message}).") from None
    if rewards is not None:
        rewards[raw] = reward
    return reward


def _parse_value(method: str, key: str, raw: str, hint, allow_imports: bool = True, rewards: dict | None = None):
    if raw.startswith("@"):  # a Python object: @module:attribute
        import importlib

        if not allow_imports:
            raise ValueError(f"Option {key!r} of method {method!r}: `@module:attribute` values are not accepted here.")
        module, _, attr = raw[1:].partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"Option {key!r} of method {method!r}: cannot import {raw[1:]!r}.") from None
    if key == "reward" or "reward" in str(hint).lower():
        return _load_reward(method, key, raw, rewards)
    text = str(hint)
    try:
        if "bool" in text:
            if raw.lower() in ("true", "false", "1", "0", "yes", "no"):
                return raw.lower() in ("true", "1", "yes")
            if "str" not in text:  # `bool | str` (a mode beside on / off) takes the word itself
                raise ValueError
        if "dict" in text:  # k:v;k:v
            pairs = (item.split(":") for item in raw.split(";") if item)
            return {int(k) if k.strip().lstrip("-").isdigit() else k.strip(): float(v) for k, v in pairs}
        if "tuple" in text:  # 16x16
            return tuple(int(v) for v in raw.lower().split("x"))
        if "int" in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError:
        raise ValueError(f"Bad value {raw!r} for option {key!r} of method {method!r} (expected {text}).") from None
    return raw


def method_fields(name: str) -> set[str]:
    """The options (dataclass fields set at construction) of the method named `name`."""
    return {f.name for f in dataclasses.fields(METHODS[name]) if f.init}


def parse_spec(
    spec: str, allowed: set[str] | None = None, allow_imports: bool = True, rewards: dict | None = None
) -> tuple[str, dict]:
    """Parses a spec `NAME[:key=value,...]` into `(name, options)` without building the method (see
    :func:`method_from_spec` for the value syntax). `rewards` maps reward names to loaded rewards: a name found there
    is reused, and one loaded is added to it, so each reward is loaded once."""
    if not isinstance(spec, str):
        raise ValueError(f"A method spec must be a string NAME[:key=value,...], got {type(spec).__name__}.")
    name, _, options = spec.partition(":")
    name = name.strip()
    if name not in METHODS:
        raise ValueError(f"Unknown alignment method {name[:80]!r}; available: {', '.join(sorted(METHODS))}.")
    if allowed is not None and name not in allowed:
        raise ValueError(f"Method {name!r} is not allowed here; allowed: {', '.join(sorted(allowed)) or 'none'}.")
    hints = typing.get_type_hints(METHODS[name])
    fields = method_fields(name)
    kwargs = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"Option {item[:80]!r} of method {name!r} must be written key=value.")
        if key not in fields:
            raise ValueError(f"Unknown option {key[:80]!r} for method {name!r}; options: {', '.join(sorted(fields))}.")
        if key in kwargs:
            raise ValueError(f"Option {key!r} of method {name!r} is given twice.")
        kwargs[key] = _parse_value(name, key, raw.strip(), hints.get(key), allow_imports, rewards)
    return name, kwargs


def build_method(name: str, options: dict) -> AlignmentMethod:
    """`METHODS[name](**options)`, every failure a one-line `ValueError` naming the method."""
    try:
        return METHODS[name](**options)
    except ValueError as err:
        raise ValueError(f"Method {name!r}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - a missing option (TypeError) or a value the method cannot take
        raise ValueError(
            f"Method {name!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def method_from_spec(
    spec: str, allowed: set[str] | None = None, allow_imports: bool = True, rewards: dict | None = None
) -> AlignmentMethod:
    """Builds a method from a command-line spec `NAME[:key=value,...]`.

    Values are parsed by the option's type: numbers, booleans, `16x16` for tuples, `0:0.05;10:0.5` for dicts, a
    reward's short name for rewards, and `@module:attribute` for any Python object (a function, for example). Every
    malformed spec raises a one-line `ValueError`. `allowed` limits the method names; `allow_imports=False` refuses
    `@module:attribute` values; `rewards` reuses loaded rewards by name (see :func:`parse_spec`).

    Example: `method_from_spec("best_of_n:n=4,reward=jpeg_incompressibility")`.
    """
    return build_method(*parse_spec(spec, allowed, allow_imports, rewards))


__all__ = [
    "METHODS",
    "AlignmentMethod",
    "AttendAndExcite",
    "RegionReweight",
    "TokenReweight",
    "BestOfN",
    "NoiseOptimization",
    "ParticleSteering",
    "PreviewX0",
    "PromptRewrite",
    "Promptist",
    "RewardGuidance",
    "SeedSearch",
    "TraceLatents",
    "build_method",
    "method_fields",
    "method_from_spec",
    "parse_spec",
]
