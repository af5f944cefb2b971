"""The OpenAI Images API as the server speaks it: request parsing and validation, limits, and error bodies.

`POST /v1/images/generations` takes the JSON body the official `openai` client sends (`prompt`, `model`, `n`, `size`,
`response_format`, `stream`, `partial_images`, ...); ttalign's own options travel in the client's `extra_body` under
`"ttalign"`: `{"alignment": ["best_of_n:n=4,reward=shapes_soft"], "seed": 3, "steps": 25, "guidance_scale": 3.0,
"negative_prompt": "..."}`. Every bad value is answered with `{"error": {"message", "type", "param", "code"}}` and the
HTTP status the client maps to its exception classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Top-level fields of the client's request body that the server accepts (and ignores where they do not apply).
OPENAI_FIELDS = frozenset({"prompt", "model", "n", "size", "response_format", "stream", "partial_images", "quality",
                           "style", "background", "moderation", "output_format", "output_compression", "user",
                           "safety_identifier", "ttalign"})  # fmt: skip
#: Fields of the `ttalign` object.
TTALIGN_FIELDS = frozenset({"alignment", "seed", "steps", "guidance_scale", "negative_prompt", "eta"})
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
#: Integer options of alignment methods that multiply a request's compute, capped by `Limits.max_method_option`.
COSTLY_OPTIONS = ("n", "particles", "steps", "rounds", "neighbors", "candidates", "max_refinement_steps")


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}  # fmt: skip


@dataclass
class Limits:
    """What one request may ask for. Every field is validated in `__post_init__`.

    Args:
        max_prompt_chars (`int`, defaults to 2000): prompt and negative prompt length.
        max_n (`int`, defaults to 10): images per request (the OpenAI API's limit).
        max_side (`int`, defaults to 1024): the largest image side in pixels.
        max_steps (`int`, defaults to 100): denoising steps.
        max_guidance (`float`, defaults to 30): classifier-free guidance scale.
        max_method_option (`int`, defaults to 100): the largest value of an alignment method's compute-multiplying
            integer option (`n`, `particles`, `steps`, `rounds`, `neighbors`, `max_refinement_steps`; DNO's preset
            takes 100 steps).
        max_methods (`int`, defaults to 4): alignment methods per request.
    """

    max_prompt_chars: int = 2000
    max_n: int = 10
    max_side: int = 1024
    max_steps: int = 100
    max_guidance: float = 30.0
    max_method_option: int = 100
    max_methods: int = 4

    def __post_init__(self):
        for key in ("max_prompt_chars", "max_n", "max_side", "max_steps", "max_method_option", "max_methods"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{key} must be an integer >= 1, got {value!r}.")
        if not self.max_guidance > 0:
            raise ValueError(f"Limits.max_guidance must be > 0, got {self.max_guidance!r}.")


@dataclass
class ImageRequest:
    """A validated generation request."""

    prompt: str
    n: int = 1
    width: int | None = None
    height: int | None = None
    stream: bool = False
    partial_images: int = 0
    output_format: str = "png"
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    eta: float | None = None
    alignment: tuple[str, ...] | None = None

    def merge_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (each image keeps its own generator)."""
        return (self.width, self.height, self.steps, self.guidance_scale, self.negative_prompt, self.eta,
                self.alignment)  # fmt: skip


def _int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"`{name}` must be an integer, got {value!r:.80}.", param=name, code="invalid_value")
    if not low <= value <= high:
        raise APIError(400, f"`{name}` must be between {low} and {high}, got {value}.", param=name,
                       code="invalid_value")  # fmt: skip
    return value


def _float(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"`{name}` must be a finite number, got {value!r:.80}.", param=name, code="invalid_value")
    if not low <= value <= high:
        raise APIError(400, f"`{name}` must be between {low} and {high}, got {value}.", param=name,
                       code="invalid_value")  # fmt: skip
    return float(value)


def _text(value, name: str, limits: Limits, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise APIError(400, f"`{name}` must be a non-empty string.", param=name, code="invalid_value")
    if len(value) > limits.max_prompt_chars:
        raise APIError(400, f"`{name}` has {len(value)} characters; the limit is {limits.max_prompt_chars}.",
                       param=name, code="string_above_max_length")  # fmt: skip
    return value


def parse_size(size, limits: Limits, multiple: int = 8) -> tuple[int | None, int | None]:
    """`"WxH"` (or `None` / `"auto"`: the model's default) -> `(width, height)`."""
    if size is None or size == "auto":
        return None, None
    if not isinstance(size, str) or size.count("x") != 1:
        raise APIError(400, f"`size` must be a string 'WIDTHxHEIGHT', got {size!r:.80}.", param="size",
                       code="invalid_value")  # fmt: skip
    w, h = size.split("x")
    if not (w.isdigit() and h.isdigit()):
        raise APIError(400, f"`size` must be 'WIDTHxHEIGHT' in pixels, got {size!r:.80}.", param="size",
                       code="invalid_value")  # fmt: skip
    width, height = int(w), int(h)
    for side in (width, height):
        if not multiple <= side <= limits.max_side or side % multiple:
            raise APIError(400, f"`size` sides must be multiples of {multiple} between {multiple} and "
                           f"{limits.max_side}, got {size}.", param="size", code="invalid_value")  # fmt: skip
    return width, height


def parse_request(body, limits: Limits, served_model: str, size_multiple: int = 8) -> ImageRequest:
    """Validates a request body; raises :class:`APIError` (400 / 404) naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(body) - OPENAI_FIELDS)
    if unknown:
        raise APIError(400, f"Unknown field {unknown[0]!r:.80}.", param=str(unknown[0])[:80], code="unknown_parameter")
    prompt = _text(body.get("prompt"), "prompt", limits, required=True)
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(404, f"The model {model!r:.80} is not served here; this server serves {served_model!r}.",
                       param="model", code="model_not_found")  # fmt: skip
    n = 1 if body.get("n") is None else _int(body["n"], "n", 1, limits.max_n)
    response_format = body.get("response_format")
    if response_format not in (None, "b64_json"):
        if response_format == "url":
            raise APIError(400, "`response_format` 'url' is not supported: this server returns images inline; use "
                           "'b64_json'.", param="response_format", code="unsupported_value")  # fmt: skip
        raise APIError(400, f"`response_format` must be 'b64_json', got {response_format!r:.80}.",
                       param="response_format", code="invalid_value")  # fmt: skip
    output_format = body.get("output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise APIError(400, f"`output_format` must be one of {sorted(OUTPUT_FORMATS)}, got {output_format!r:.80}.",
                       param="output_format", code="invalid_value")  # fmt: skip
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, f"`stream` must be true or false, got {stream!r:.80}.", param="stream",
                       code="invalid_value")  # fmt: skip
    partial = body.get("partial_images")
    partial = (2 if stream else 0) if partial is None else _int(partial, "partial_images", 0, 3)
    if stream and n != 1:
        raise APIError(400, "Streaming returns one image: use `n` = 1 with `stream`.", param="n", code="invalid_value")
    width, height = parse_size(body.get("size"), limits, size_multiple)

    options = body.get("ttalign") or {}
    if not isinstance(options, dict):
        raise APIError(400, "`ttalign` must be an object.", param="ttalign", code="invalid_value")
    unknown = sorted(set(options) - TTALIGN_FIELDS)
    if unknown:
        raise APIError(400, f"Unknown field {unknown[0]!r:.80} in `ttalign`; fields: {sorted(TTALIGN_FIELDS)}.",
                       param=f"ttalign.{str(unknown[0])[:80]}", code="unknown_parameter")  # fmt: skip
    seed = options.get("seed")
    seed = None if seed is None else _int(seed, "ttalign.seed", 0, 2**63 - 1 - limits.max_n)
    steps = options.get("steps")
    steps = None if steps is None else _int(steps, "ttalign.steps", 1, limits.max_steps)
    guidance = options.get("guidance_scale")
    guidance = None if guidance is None else _float(guidance, "ttalign.guidance_scale", 0.0, limits.max_guidance)
    eta = options.get("eta")
    eta = None if eta is None else _float(eta, "ttalign.eta", 0.0, 1.0)
    negative = _text(options.get("negative_prompt"), "ttalign.negative_prompt", limits)
    alignment = options.get("alignment")
    if alignment is not None:
        if isinstance(alignment, str):
            alignment = [alignment]
        if not isinstance(alignment, list) or not all(isinstance(s, str) for s in alignment):
            raise APIError(400, "`ttalign.alignment` must be a list of method specs 'NAME[:key=value,...]'.",
                           param="ttalign.alignment", code="invalid_value")  # fmt: skip
        if len(alignment) > limits.max_methods:
            raise APIError(400, f"At most {limits.max_methods} alignment methods per request, got {len(alignment)}.",
                           param="ttalign.alignment", code="invalid_value")  # fmt: skip
        alignment = tuple(s.strip() for s in alignment)
    return ImageRequest(prompt=prompt, n=n, width=width, height=height, stream=stream, partial_images=partial,
                        output_format=output_format, seed=seed, steps=steps, guidance_scale=guidance,
                        negative_prompt=negative, eta=eta, alignment=alignment)  # fmt: skip


def check_method_budget(method, spec: str, limits: Limits) -> None:
    """Refuses (`ValueError`) a method whose compute-multiplying integer options exceed the server's limit."""
    for key in COSTLY_OPTIONS:
        value = getattr(method, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_method_option:
            raise ValueError(f"Option {key}={value} of {spec!r} is above this server's limit "
                             f"({limits.max_method_option}).")  # fmt: skip
