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


def _parse_value(method: str, key: str, raw: str, hint, allow_imports: bool = True):
    from ttalign.rewards import load_reward

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
        try:
            return load_reward(raw)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - a checkpoint that cannot be loaded here is a bad option value
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"Option {key!r} of method {method!r}: cannot load reward {raw!r} ({message}).") from None
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


def method_from_spec(spec: str, allowed: set[str] | None = None, allow_imports: bool = True) -> AlignmentMethod:
    """Builds a method from a command-line spec `NAME[:key=value,...]`.

    Values are parsed by the option's type: numbers, booleans, `16x16` for tuples, `0:0.05;10:0.5` for dicts, a
    reward's short name for rewards, and `@module:attribute` for any Python object (a function, for example). Every
    malformed spec raises a one-line `ValueError`. `allowed` limits the method names; `allow_imports=False` refuses
    `@module:attribute` values (the server's requests).

    Example: `method_from_spec("best_of_n:n=4,reward=jpeg_incompressibility")`.
    """
    if not isinstance(spec, str):
        raise ValueError(f"A method spec must be a string NAME[:key=value,...], got {type(spec).__name__}.")
    name, _, options = spec.partition(":")
    name = name.strip()
    if name not in METHODS:
        raise ValueError(f"Unknown alignment method {name!r}; available: {', '.join(sorted(METHODS))}.")
    if allowed is not None and name not in allowed:
        raise ValueError(f"Method {name!r} is not allowed here; allowed: {', '.join(sorted(allowed)) or 'none'}.")
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
        if key in kwargs:
            raise ValueError(f"Option {key!r} of method {name!r} is given twice.")
        kwargs[key] = _parse_value(name, key, raw.strip(), hints.get(key), allow_imports)
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"Method {name!r}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - a missing option (TypeError) or a value the method cannot take
        raise ValueError(
            f"Method {name!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None


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
    "method_from_spec",
]
