"""The OpenAI Images API as the server speaks it: request parsing and validation, limits, and error bodies.

`POST /v1/images/generations` takes the JSON body the official `openai` client sends (`prompt`, `model`, `n`, `size`,
`response_format`, `stream`, `partial_images`, ...); ttalign's own options travel in the client's `extra_body` under
`"ttalign"`: `{"alignment": ["best_of_n:n=4,reward=shapes_soft"], "seed": 3, "steps": 25, "guidance_scale": 3.0,
"negative_prompt": "..."}`. Every bad value is answered with `{"error": {"message", "type", "param", "code"}}` and the
HTTP status the client maps to its exception classes. What a request's methods may set is the request policy's
business (:mod:`ttalign.serve.policy`); this module only checks the shape of the body.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

#: Top-level fields of the client's request body that the server accepts (and ignores where they do not apply).
OPENAI_FIELDS = frozenset(
    {
        "prompt",
        "model",
        "n",
        "size",
        "response_format",
        "stream",
        "partial_images",
        "quality",
        "style",
        "background",
        "moderation",
        "output_format",
        "output_compression",
        "user",
        "safety_identifier",
        "ttalign",
    }
)
#: Fields of the `ttalign` object.
TTALIGN_FIELDS = frozenset({"alignment", "seed", "steps", "guidance_scale", "negative_prompt", "eta"})
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
#: The longest error message sent (longer ones are cut), and the longest quoted value inside one.
MAX_MESSAGE_CHARS = 1000
MAX_QUOTED_CHARS = 80
#: JSON bodies nested deeper than this are refused (the API's deepest valid body has depth 4).
MAX_JSON_DEPTH = 16
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def quote(value) -> str:
    """`repr(value)` cut to `MAX_QUOTED_CHARS`, for error messages."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED_CHARS else text[: MAX_QUOTED_CHARS - 3] + "..."


def _printable(text: str) -> str:
    """`text` with lone surrogates escaped, so that it can be encoded as UTF-8 JSON."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`; the message is cut
    to `MAX_MESSAGE_CHARS` and made one line, so no value of a request comes back whole."""

    TYPES = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "invalid_request_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
        504: "timeout",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message = _printable(" ".join(str(message).split()))
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.param = None if param is None else _printable(str(param)[:MAX_QUOTED_CHARS])
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class Limits:
    """What one request may ask for. Every field is validated in `__post_init__`.

    Args:
        max_prompt_chars (`int`, defaults to 2000): prompt and negative prompt length.
        max_n (`int`, defaults to 10): images per request (the OpenAI API's limit).
        max_size_factor (`float`, defaults to 1.5): the largest image side, as a multiple of the model's native side
            (SD 1.5: 512 px, so at most 768; SDXL: 1536; the shapes models: 48).
        max_steps (`int`, defaults to 100): denoising steps.
        max_guidance (`float`, defaults to 30): classifier-free guidance scale.
        max_candidates (`int`, defaults to 16): the largest value of a method's count options (best-of-N's `n`,
            particles, seed-search candidates, refinement iterations): the memory side of a request's cost.
        max_image_steps (`float`, defaults to 2000): a request's total compute, in image-steps (one denoiser
            evaluation of one image at the native resolution), counting every image, candidate, particle and
            optimization pass (see `ttalign.hooks.price_image_steps`).
        max_methods (`int`, defaults to 4): alignment methods per request.
        max_spec_chars (`int`, defaults to 1000): the length of one method spec.
    """

    max_prompt_chars: int = 2000
    max_n: int = 10
    max_size_factor: float = 1.5
    max_steps: int = 100
    max_guidance: float = 30.0
    max_candidates: int = 16
    max_image_steps: float = 2000.0
    max_methods: int = 4
    max_spec_chars: int = 1000

    def __post_init__(self):
        for key in ("max_prompt_chars", "max_n", "max_steps", "max_candidates", "max_methods", "max_spec_chars"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{key} must be an integer >= 1, got {value!r}.")
        for key in ("max_size_factor", "max_guidance", "max_image_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"Limits.{key} must be a finite number > 0, got {value!r}.")


@dataclass
class ImageRequest:
    """A validated generation request. `alignment` holds the request's method specs as sent (strings or objects),
    until the request policy replaces them with their canonical keys."""

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
    alignment: tuple | None = None

    def merge_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (each image keeps its own generator)."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.negative_prompt,
            self.eta,
            self.alignment,
        )


def _bad(name: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=name, code=code)


def _int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"`{name}` must be an integer, got {quote(value)}.")
    if not low <= value <= high:
        raise _bad(name, f"`{name}` must be between {low} and {high}, got {quote(value)}.")
    return value


def _float(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"`{name}` must be a finite number, got {quote(value)}.")
    if not low <= value <= high:
        raise _bad(name, f"`{name}` must be between {low} and {high}, got {quote(value)}.")
    return float(value)


def _text(value, name: str, limits: Limits, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise _bad(name, f"`{name}` must be a non-empty string.")
    if len(value) > limits.max_prompt_chars:
        raise _bad(
            name,
            f"`{name}` has {len(value)} characters; the limit is {limits.max_prompt_chars}.",
            code="string_above_max_length",
        )
    return value


def load_json(raw: bytes):
    """Parses a request body: UTF-8 JSON (standard JSON: no `NaN` or `Infinity`), at most `MAX_JSON_DEPTH` deep, no
    lone surrogate in any string (they cannot be encoded again, so no tokenizer or response could take them). Raises
    `APIError(400)`."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    stack = [(body, "", 0)]  # iterative: the depth check must not itself recurse
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(
                400,
                f"The request body is nested deeper than {MAX_JSON_DEPTH} levels.",
                param=path or None,
                code="invalid_json",
            )
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path or "body")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path or "body")
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(
            400, f"`{path}` holds a lone surrogate (not valid Unicode text).", param=path, code="invalid_json"
        ) from None


def parse_size(size, limits: Limits, multiple: int = 8, max_side: int = 1024) -> tuple[int | None, int | None]:
    """`"WxH"` (or `None` / `"auto"`: the model's default) -> `(width, height)`; each side a multiple of `multiple`
    between `multiple` and `max_side`."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None:
        raise _bad("size", f"`size` must be a string 'WIDTHxHEIGHT' in pixels, or 'auto', got {quote(size)}.")
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        if not multiple <= side <= max_side or side % multiple:
            raise _bad(
                "size",
                f"`size` sides must be multiples of {multiple} between {multiple} and {max_side} "
                f"({limits.max_size_factor:g} x the model's native side), got {size}.",
            )
    return width, height


def parse_request(
    body, limits: Limits, served_model: str, size_multiple: int = 8, max_side: int = 1024
) -> ImageRequest:
    """Validates a request body; raises :class:`APIError` (400 / 404) naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(body) - OPENAI_FIELDS)
    if unknown:
        raise _bad(unknown[0], f"Unknown field {quote(unknown[0])}.", code="unknown_parameter")
    prompt = _text(body.get("prompt"), "prompt", limits, required=True)
    model = body.get("model")
    if model is not None and model != served_model:
        raise APIError(
            404,
            f"The model {quote(model)} is not served here; this server serves {served_model!r}.",
            param="model",
            code="model_not_found",
        )
    n = 1 if body.get("n") is None else _int(body["n"], "n", 1, limits.max_n)
    response_format = body.get("response_format")
    if response_format is not None and response_format != "b64_json":
        if response_format == "url":
            raise _bad(
                "response_format",
                "`response_format` 'url' is not supported: this server returns images inline; use 'b64_json'.",
                code="unsupported_value",
            )
        raise _bad("response_format", f"`response_format` must be 'b64_json', got {quote(response_format)}.")
    output_format = body.get("output_format")
    output_format = "png" if output_format is None else output_format
    if not isinstance(output_format, str) or output_format not in OUTPUT_FORMATS:
        raise _bad(
            "output_format", f"`output_format` must be one of {sorted(OUTPUT_FORMATS)}, got {quote(output_format)}."
        )
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise _bad("stream", f"`stream` must be true or false, got {quote(stream)}.")
    partial = body.get("partial_images")
    partial = (2 if stream else 0) if partial is None else _int(partial, "partial_images", 0, 3)
    if stream and n != 1:
        raise _bad("n", "Streaming returns one image: use `n` = 1 with `stream`.")
    width, height = parse_size(body.get("size"), limits, size_multiple, max_side)

    options = body.get("ttalign")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise _bad("ttalign", "`ttalign` must be an object.")
    unknown = sorted(set(options) - TTALIGN_FIELDS)
    if unknown:
        raise _bad(
            f"ttalign.{unknown[0]}",
            f"Unknown field {quote(unknown[0])} in `ttalign`; fields: {sorted(TTALIGN_FIELDS)}.",
            code="unknown_parameter",
        )
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
        if isinstance(alignment, (str, dict)):
            alignment = [alignment]
        if not isinstance(alignment, list) or not all(isinstance(s, (str, dict)) for s in alignment):
            raise _bad(
                "ttalign.alignment",
                "`ttalign.alignment` must be a list of method specs "
                "'NAME[:key=value,...]' or objects {\"name\": NAME, key: value, ...}.",
            )
        if len(alignment) > limits.max_methods:
            raise _bad(
                "ttalign.alignment",
                f"At most {limits.max_methods} alignment methods per request, got {len(alignment)}.",
            )
        alignment = tuple(alignment)
    return ImageRequest(
        prompt=prompt,
        n=n,
        width=width,
        height=height,
        stream=stream,
        partial_images=partial,
        output_format=output_format,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        negative_prompt=negative,
        eta=eta,
        alignment=alignment,
    )
