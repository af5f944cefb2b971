"""The request policy: what a request may set, what it costs, and what stays the server's.

A request names alignment methods in `extra_body={"ttalign": {"alignment": [...]}}`, as a spec string
`"best_of_n:n=4,reward=shapes_soft"` or an object `{"name": "best_of_n", "n": 4, "reward": "shapes_soft"}`. The policy
stands between that body and the methods, before anything is queued:

- only the methods the operator allowed (`--allow NAME[:key=value,...]`) and, of each, only the options in
  `REQUEST_OPTIONS`, each with its type and bounds. Everything else comes from the server's configuration: the options
  written in the `--allow` spec, then the method's defaults. A request never sets a URL, a model name, an API key or
  the variable holding one, a timeout, a retry count, a device, a file path or a module (`@module:attribute`);
- a reward only by the name of one the server loaded at start-up (`--reward NAME`, and the rewards its own specs
  name): nothing is loaded for a request;
- the request's total compute, priced from the methods' own declarations (`renders_per_image`,
  `extra_evaluations_per_render`) in image-steps at the model's native resolution, within `Limits.max_image_steps`;
- sizes up to the native side times `Limits.max_size_factor`;
- each method's prompt checks (a reward that parses its prompts refuses one it cannot parse), so a request that would
  fail in a merged call is refused alone, with a 400.

Built methods are cached by the request's canonical spec (options parsed, sorted, defaults left out), in a bounded LRU:
specs that differ only in spelling share one method object, and so can share one pipeline call.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from ttalign.hooks import AlignmentRunner, price_image_steps

from .protocol import APIError, ImageRequest, Limits, parse_request, quote

_INT = re.compile(r"[+-]?[0-9]{1,12}")
_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,12}(?:\.[0-9]{0,12})?|\.[0-9]{1,12})(?:[eE][+-]?[0-9]{1,3})?")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class OptionError(ValueError):
    """A request's value that an option refuses."""


# --- the options a request may set ---------------------------------------------------------------------------------


class Option:
    """One request-settable option: `coerce` checks a request's value (the text of a spec string, or a JSON value)
    and returns its canonical, hashable form; `argument` turns that into the method's keyword argument."""

    def coerce(self, value, policy: RequestPolicy):
        raise NotImplementedError

    def argument(self, value, policy: RequestPolicy):
        return value

    def describe(self, policy: RequestPolicy) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Option):
    """An integer in `[low, high]`; `high=None` is the server's `Limits.max_candidates` (count options, whose value
    sets how many latents are held at once or how many passes run)."""

    low: int = 0
    high: int | None = None
    odd: bool = False

    def bounds(self, policy: RequestPolicy) -> tuple[int, int]:
        return self.low, policy.limits.max_candidates if self.high is None else self.high

    def coerce(self, value, policy):
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"expected an integer, got {quote(value)}")
        low, high = self.bounds(policy)
        if not low <= value <= high:
            raise OptionError(f"must be between {low} and {high}, got {value}")
        if self.odd and value % 2 == 0:
            raise OptionError(f"must be odd, got {value}")
        return value

    def describe(self, policy):
        low, high = self.bounds(policy)
        return f"{'odd ' if self.odd else ''}integer {low}-{high}"


@dataclass(frozen=True)
class Float(Option):
    """A finite number in `[low, high]` (`low` itself excluded with `open_low`)."""

    low: float
    high: float
    open_low: bool = False

    def coerce(self, value, policy):
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OptionError(f"expected a finite number, got {quote(value)}")
        if not (self.low < value if self.open_low else self.low <= value) or value > self.high:
            raise OptionError(f"must be in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}], got {value:g}")
        return float(value)

    def describe(self, policy):
        return f"number in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Choice(Option):
    choices: tuple[str, ...]

    def coerce(self, value, policy):
        if not isinstance(value, str) or value.strip() not in self.choices:
            raise OptionError(f"must be one of {list(self.choices)}, got {quote(value)}")
        return value.strip()

    def describe(self, policy):
        return " | ".join(self.choices)


@dataclass(frozen=True)
class Flag(Option):
    def coerce(self, value, policy):
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise OptionError(f"expected true or false, got {quote(value)}")
        return value

    def describe(self, policy):
        return "true | false"


@dataclass(frozen=True)
class RewardName(Option):
    """The name of a reward the server loaded at start-up."""

    def coerce(self, value, policy):
        name = value.strip() if isinstance(value, str) else value
        if not isinstance(name, str) or name not in policy.rewards:
            loaded = ", ".join(sorted(policy.rewards)) or "none (start the server with --reward NAME)"
            raise OptionError(f"must name a reward this server loaded: {loaded}; got {quote(value)}")
        return name

    def argument(self, value, policy):
        return policy.rewards[value]

    def describe(self, policy):
        return " | ".join(sorted(policy.rewards)) or "(no reward loaded)"


def _phrase(text, max_chars: int) -> str:
    if not isinstance(text, str) or not text.strip():
        raise OptionError(f"expected a non-empty word or phrase, got {quote(text)}")
    text = text.strip()
    if len(text) > max_chars or any(not c.isprintable() for c in text):
        raise OptionError(f"a phrase has at most {max_chars} printable characters, got {quote(text)}")
    return text


@dataclass(frozen=True)
class Words(Option):
    """Words or phrases: `cat+dog` in a spec string, a list of strings in an object."""

    max_items: int = 8
    max_chars: int = 40

    def coerce(self, value, policy):
        items = [w for w in value.split("+") if w.strip()] if isinstance(value, str) else value
        if not isinstance(items, list) or not 1 <= len(items) <= self.max_items:
            raise OptionError(f"expected 1 to {self.max_items} words, got {quote(value)}")
        return tuple(_phrase(w, self.max_chars) for w in items)

    def argument(self, value, policy):
        return list(value)

    def describe(self, policy):
        return f"1-{self.max_items} words, 'a+b' or a list"


@dataclass(frozen=True)
class StepValues(Option):
    """A value per denoising step: `0:0.05;10:0.5` in a spec string, `{"0": 0.05, "10": 0.5}` in an object."""

    value: Float
    max_items: int = 10

    def coerce(self, value, policy):
        if isinstance(value, str):
            pairs = [item.split(":", 1) for item in value.split(";") if item.strip()]
            if any(len(p) != 2 for p in pairs):
                raise OptionError(f"expected STEP:VALUE;..., got {quote(value)}")
        elif isinstance(value, dict):
            pairs = list(value.items())
        else:
            raise OptionError(f"expected STEP:VALUE;... or an object, got {quote(value)}")
        if not 1 <= len(pairs) <= self.max_items:
            raise OptionError(f"expected 1 to {self.max_items} steps, got {len(pairs)}")
        steps = Int(0, policy.limits.max_steps)
        out = {}
        for step, item in pairs:
            out[steps.coerce(step, policy)] = self.value.coerce(item, policy)
        return tuple(sorted(out.items()))

    def argument(self, value, policy):
        return dict(value)

    def describe(self, policy):
        return f"STEP:VALUE;... (values {self.value.describe(policy)})"


@dataclass(frozen=True)
class Regions(Option):
    """Phrases and their boxes in `[0, 1]` image coordinates: `red circle:0 0 0.5 1;blue square:0.5 0 1 1` in a spec
    string, `{"red circle": [0, 0, 0.5, 1]}` in an object."""

    max_items: int = 8
    max_chars: int = 40

    def coerce(self, value, policy):
        if isinstance(value, str):
            items = []
            for item in filter(str.strip, value.split(";")):
                phrase, sep, box = item.rpartition(":")
                if not sep:
                    raise OptionError(f"expected PHRASE:X0 Y0 X1 Y1;..., got {quote(item)}")
                items.append((phrase, box.split()))
        elif isinstance(value, dict):
            items = list(value.items())
        else:
            raise OptionError(f"expected PHRASE:X0 Y0 X1 Y1;... or an object, got {quote(value)}")
        if not 1 <= len(items) <= self.max_items:
            raise OptionError(f"expected 1 to {self.max_items} regions, got {len(items)}")
        unit = Float(0.0, 1.0)
        out = {}
        for phrase, box in items:
            if not isinstance(box, list) or len(box) != 4:
                raise OptionError(f"a box is 4 numbers x0 y0 x1 y1, got {quote(box)}")
            x0, y0, x1, y1 = (unit.coerce(v, policy) for v in box)
            if not (x0 < x1 and y0 < y1):
                raise OptionError(f"a box needs x0 < x1 and y0 < y1, got {quote(box)}")
            out[_phrase(phrase, self.max_chars)] = (x0, y0, x1, y1)
        return tuple(sorted(out.items()))

    def argument(self, value, policy):
        return dict(value)

    def describe(self, policy):
        return f"1-{self.max_items} 'PHRASE:X0 Y0 X1 Y1' joined by ';', or an object"


_UNIT = Float(0.0, 1.0)
_COUNT = Int(1)  # bounded by Limits.max_candidates
#: Per method: the options a request may set, with their bounds. Every other option of a method is the server's.
REQUEST_OPTIONS: dict[str, dict[str, Option]] = {
    "best_of_n": {"reward": RewardName(), "n": _COUNT, "reward_batch_size": Int(1, 64)},
    "seed_search": {
        "reward": RewardName(),
        "n": _COUNT,
        "rounds": Int(0),
        "neighbors": _COUNT,
        "radius": Float(0.0, 4.0, open_low=True),
    },
    "noise_optimization": {
        "reward": RewardName(),
        "steps": Int(1, 1000),
        "lr": Float(0.0, 100.0, open_low=True),
        "optimizer": Choice(("sgd", "adamw")),
        "momentum": Float(0.0, 0.999),
        "grad_clip": Float(0.0, 100.0, True),
        "regularizer": Float(0.0, 100.0),
        "optimize": Choice(("initial", "all-noises")),
        "eta": _UNIT,
        "patience": Int(1, 1000),
        "target": Float(-1e6, 1e6),
    },
    "reward_guidance": {
        "reward": RewardName(),
        "scale": Float(0.0, 1000.0),
        "start": _UNIT,
        "stop": _UNIT,
        "every": Int(1, 1000),
        "grad_clip": Float(0.0, 1e6, open_low=True),
    },
    "particle_steering": {
        "reward": RewardName(),
        "particles": _COUNT,
        "potential": Choice(("max", "add", "diff")),
        "lmbda": Float(0.0, 1000.0),
        "resample_every": Int(1, 1000),
        "resample_start": _UNIT,
        "resample_stop": _UNIT,
        "ess_threshold": _UNIT,
        "eta": _UNIT,
        "reward_min": Float(-1e6, 1e6),
    },
    "attend_and_excite": {
        "tokens": Words(),
        "max_iter_to_alter": Int(0, 1000),
        "thresholds": StepValues(_UNIT),
        "scale_factor": Float(0.0, 100.0, open_low=True),
        "smooth_attentions": Flag(),
        "sigma": Float(0.05, 10.0),
        "kernel_size": Int(1, 15, odd=True),
        "normalize_eot": Flag(),
        "max_refinement_steps": Int(0),
    },
    "token_reweight": {"mode": Choice(("embedding", "attention"))},
    "region_reweight": {
        "regions": Regions(),
        "cross_weight": Float(0.0, 10.0),
        "self_weight": Float(0.0, 10.0),
        "size_weight": Float(0.0, 10.0),
        "stop": _UNIT,
        "time_power": Float(0.0, 20.0),
        "encode_phrases": Flag(),
    },
    "prompt_rewrite": {
        "reward": RewardName(),
        "candidates": Int(1, 8),
        "rounds": Int(1, 8),
        "temperature": Float(0.0, 2.0),
    },
    "promptist": {"num_beams": Int(1, 16), "max_new_tokens": Int(1, 77), "length_penalty": Float(-5.0, 5.0)},
    "trace_latents": {"every": Int(1, 1000)},
}


def _equal(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are different
        return False


# --- the policy ----------------------------------------------------------------------------------------------------


@dataclass
class Admission:
    """A request the policy let through: the validated request (its `alignment` now the canonical key), its built
    methods, and its price in image-steps."""

    request: ImageRequest
    methods: list
    cost: float


class RequestPolicy:
    """Decides, before queuing, what a request may set and what it may cost (see the module's docstring).

    Args:
        limits (`Limits`).
        model_name (`str`): the model id requests may name.
        allow (`dict[str, dict]`): per allowed method, the options the server fixes (parsed, rewards loaded).
        default_alignment (`list`): the methods of requests that name none (built by the server).
        rewards (`dict[str, reward]`): the loaded rewards a request may name.
        native_side (`int`): the model's native image side in pixels; size_multiple (`int`).
        default_steps (`int`): the steps of a request that sets none.
        takes_eta (`bool`): whether the pipeline takes DDIM's `eta`.
        features (`frozenset[str]`): the model family's features, checked against each method's needs.
        cache_size (`int`, defaults to 64): built methods kept (least recently used dropped first).
        family (*optional*): the pipeline's model family, whose tokenizers methods check prompts with.
    """

    def __init__(
        self,
        limits: Limits,
        model_name: str,
        allow: Mapping[str, dict],
        default_alignment: list,
        rewards: Mapping,
        native_side: int,
        size_multiple: int = 8,
        default_steps: int = 50,
        takes_eta: bool = True,
        features: frozenset = frozenset(),
        cache_size: int = 64,
        family=None,
    ):
        self.limits, self.model_name = limits, model_name
        self.allow, self.rewards = dict(allow), dict(rewards)
        self.default_alignment = list(default_alignment)
        self.native_side, self.size_multiple = native_side, size_multiple
        self.default_steps, self.takes_eta, self.features = default_steps, takes_eta, frozenset(features)
        self.max_side = int(native_side * limits.max_size_factor) // size_multiple * size_multiple
        self.cache_size, self.family = cache_size, family
        self._cache: OrderedDict = OrderedDict()

    @classmethod
    def from_config(cls, config, pipe) -> RequestPolicy:
        """The policy of a :class:`~ttalign.serve.app.ServeConfig` over `pipe`: loads the configured rewards (and
        those the server's own specs name) and parses the `--allow` and `--align` specs, now, never per request."""
        from ttalign.methods import build_method, parse_spec
        from ttalign.rewards import load_reward, reward_spec_name

        rewards = dict(config.rewards) if isinstance(config.rewards, Mapping) else {}
        for spec in [] if isinstance(config.rewards, Mapping) else config.rewards:
            rewards[reward_spec_name(spec)] = load_reward(spec)  # requests name it; its options and path stay here
        allow = {}
        for spec in config.allow:
            name, options = parse_spec(spec, rewards=rewards)
            allow[name] = options
        defaults = [build_method(*parse_spec(spec, rewards=rewards)) for spec in config.alignment]
        AlignmentRunner(defaults)  # a bad default combination fails at start-up
        from ttalign.pipelines.base import call_default

        steps = config.call_defaults.get("num_inference_steps") or call_default(pipe, "num_inference_steps", 50)
        family = pipe.family
        return cls(
            config.limits,
            config.model_name,
            allow,
            defaults,
            rewards,
            family.default_image_size,
            max(8, family.size_multiple),
            steps,
            "eta" in inspect.signature(pipe.__call__).parameters,
            getattr(family, "features", frozenset()),
            config.method_cache_size,
            family,
        )

    # --- requests ------------------------------------------------------------------------------------------------

    def admit(self, body) -> Admission:
        """Validates a request body and prices it; raises :class:`APIError` (400 / 404) naming what it refuses."""
        request = parse_request(body, self.limits, self.model_name, self.size_multiple, self.max_side)
        if request.eta is not None and not self.takes_eta:
            raise APIError(
                400,
                "ttalign.eta: this pipeline takes no eta (a flow-matching sampler); leave it out.",
                param="ttalign.eta",
                code="invalid_value",
            )
        key, methods = self.methods(request.alignment)
        request = dataclasses.replace(request, alignment=key)
        cost = self.price(request, methods)
        if cost > self.limits.max_image_steps:
            raise APIError(
                400,
                f"This request costs {cost:.0f} image-steps ({self._cost_terms(request, methods)}); "
                f"this server's budget is {self.limits.max_image_steps:g} image-steps per request.",
                param="ttalign",
                code="over_budget",
            )
        for method in methods:
            try:
                method.check_prompts([request.prompt], self.family)
            except ValueError as err:
                raise APIError(
                    400, f"{method.name} cannot take this prompt: {err}", param="prompt", code="invalid_prompt"
                ) from None
        return Admission(request, methods, cost)

    def steps(self, request: ImageRequest) -> int:
        return self.default_steps if request.steps is None else request.steps

    def price(self, request: ImageRequest, methods: list) -> float:
        """`n` x the methods' image-steps per image x the image's area over the native one."""
        width = request.width or self.native_side
        height = request.height or self.native_side
        return request.n * price_image_steps(methods, self.steps(request)) * width * height / self.native_side**2

    def _cost_terms(self, request: ImageRequest, methods: list) -> str:
        steps = self.steps(request)
        per_image = price_image_steps(methods, steps)
        area = (request.width or self.native_side) * (request.height or self.native_side) / self.native_side**2
        terms = [f"{request.n} images", f"{per_image:.0f} image-steps each at {steps} steps"]
        if area != 1:
            terms.append(f"x {area:.2f} for the size")
        costly = [f"{m.name}.{o}={getattr(m, o)}" for m in methods for o in m.costly_options if hasattr(m, o)]
        if costly:
            terms.append("driven by " + ", ".join(costly))
        return ", ".join(terms)

    def methods(self, specs) -> tuple[tuple, list]:
        """A request's methods and their canonical key: the server's defaults when it names none (`None`)."""
        if specs is None:
            return ("server-default",), list(self.default_alignment)
        keys = tuple(self._canonical(spec, i) for i, spec in enumerate(specs))
        methods = [self._build(key, i) for i, key in enumerate(keys)]
        try:
            AlignmentRunner(methods)  # refuses bad combinations now, before the request is queued
        except (ValueError, TypeError) as err:
            raise APIError(400, str(err), param="ttalign.alignment", code="invalid_method") from None
        for method in methods:
            missing = sorted(set(method.required_features) - self.features)
            if missing:
                raise APIError(
                    400,
                    f"{method.name} cannot run on this model: it needs {', '.join(missing)}.",
                    param="ttalign.alignment",
                    code="invalid_method",
                )
        return keys, methods

    def _canonical(self, spec, index: int) -> tuple:
        """`(name, ((option, value), ...))`: the options parsed and sorted; those equal to the server's value left
        out, so every spelling of one setting gives one key."""
        param = f"ttalign.alignment[{index}]"

        def refuse(message: str, code: str = "invalid_method") -> APIError:
            return APIError(400, message, param=param, code=code)

        if isinstance(spec, str):
            if len(spec) > self.limits.max_spec_chars:
                raise refuse(f"A method spec has at most {self.limits.max_spec_chars} characters, got {len(spec)}.")
            name, _, text = spec.partition(":")
            items = []
            for item in filter(None, (part.strip() for part in text.split(","))):
                key, sep, raw = item.partition("=")
                if not sep:
                    raise refuse(f"Option {quote(item)} of method {quote(name.strip())} must be written key=value.")
                items.append((key.strip(), raw.strip()))
        else:
            name = spec.get("name")
            items = [(k, v) for k, v in spec.items() if k != "name"]
        if not isinstance(name, str) or name.strip() not in self.allow:
            allowed = ", ".join(sorted(self.allow)) or "none"
            raise refuse(f"Method {quote(name)} is not allowed here; allowed: {allowed}.")
        name = name.strip()
        settable = REQUEST_OPTIONS.get(name, {})
        options = {}
        for key, value in items:
            if key in options:
                raise refuse(f"Option {quote(key)} of method {name!r} is given twice.")
            if key not in settable:
                from ttalign.methods import method_fields

                may = ", ".join(sorted(settable)) or "none"
                if key in method_fields(name):
                    raise refuse(
                        f"Option {key!r} of method {name!r} is set by the server, not by requests; requests "
                        f"may set: {may}.",
                        code="option_not_allowed",
                    )
                raise refuse(f"Unknown option {quote(key)} for method {name!r}; requests may set: {may}.")
            try:
                options[key] = settable[key].coerce(value, self)
            except OptionError as err:
                raise refuse(f"Option {key!r} of method {name!r}: {err}.") from None
        base = self._base_values(name)
        same = [k for k, v in options.items() if k in base and _equal(settable[k].argument(v, self), base[k])]
        for k in same:
            del options[k]
        return name, tuple(sorted(options.items()))

    def _base_values(self, name: str) -> dict:
        """The value of every option of method `name` when a request leaves it out: the server's, else the
        method's default."""
        from ttalign.methods import METHODS

        values = {}
        for f in dataclasses.fields(METHODS[name]):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
        return {**values, **self.allow[name]}

    def _build(self, key: tuple, index: int):
        """The method of a canonical key, from the LRU cache or built now (the server's options, then the
        request's)."""
        from ttalign.methods import build_method

        method = self._cache.get(key)
        if method is not None:
            self._cache.move_to_end(key)
            return method
        name, options = key
        settable = REQUEST_OPTIONS.get(name, {})
        arguments = {**self.allow[name], **{k: settable[k].argument(v, self) for k, v in options}}
        try:
            method = build_method(name, arguments)
        except ValueError as err:
            raise APIError(400, str(err), param=f"ttalign.alignment[{index}]", code="invalid_method") from None
        self._cache[key] = method
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return method

    @property
    def cached_methods(self) -> int:
        return len(self._cache)

    def describe(self) -> dict:
        """What `GET /v1/ttalign/methods` shows: the allowed methods with the options requests may set, the loaded
        rewards, the default alignment and the limits."""
        return {
            "allow": sorted(self.allow),
            "options": {
                name: {k: o.describe(self) for k, o in sorted(REQUEST_OPTIONS.get(name, {}).items())}
                for name in sorted(self.allow)
            },
            "rewards": sorted(self.rewards),
            "default_alignment": [m.name for m in self.default_alignment],  # names only: options may hold URLs
            "max_image_steps": self.limits.max_image_steps,
            "max_side": self.max_side,
            "max_steps": self.limits.max_steps,
            "max_n": self.limits.max_n,
        }
