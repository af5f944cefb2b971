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
from .trace import TraceLatents

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


def _parse_value(method: str, key: str, raw: str, hint):
    from ttalign.rewards import load_reward

    if raw.startswith("@"):  # a Python object: @module:attribute
        import importlib

        module, _, attr = raw[1:].partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"Option {key!r} of method {method!r}: cannot import {raw[1:]!r}.") from None
    if key == "reward" or "reward" in str(hint).lower():
        return load_reward(raw)
    text = str(hint)
    try:
        if "bool" in text:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
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


def method_from_spec(spec: str) -> AlignmentMethod:
    """Builds a method from a command-line spec `NAME[:key=value,...]`.

    Values are parsed by the option's type: numbers, booleans, `16x16` for tuples, `0:0.05;10:0.5` for dicts, a
    reward's short name for rewards, and `@module:attribute` for any Python object (a function, for example).

    Example: `method_from_spec("best_of_n:n=4,reward=jpeg_incompressibility")`.
    """
    name, _, options = spec.partition(":")
    name = name.strip()
    if name not in METHODS:
        raise ValueError(f"Unknown alignment method {name!r}; available: {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"Option {item!r} of method {name!r} must be written key=value.")
        if key not in fields:
            raise ValueError(f"Unknown option {key!r} for method {name!r}; options: {', '.join(sorted(fields))}.")
        kwargs[key] = _parse_value(name, key, raw.strip(), hints.get(key))
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required option is missing
        raise ValueError(f"Method {name!r}: {err}") from None


__all__ = [
    "METHODS",
    "AlignmentMethod",
    "AttendAndExcite",
    "RegionReweight",
    "TokenReweight",
    "BestOfN",
    "NoiseOptimization",
    "ParticleSteering",
    "PromptRewrite",
    "Promptist",
    "RewardGuidance",
    "SeedSearch",
    "TraceLatents",
    "method_from_spec",
]
