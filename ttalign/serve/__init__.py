"""`ttalign serve`: aligned generation behind the OpenAI Images API.

```py
>>> from ttalign.serve import ServeConfig, create_app
>>> config = ServeConfig(model_name="shapes", allow=["best_of_n"], rewards=["shapes_soft"])
>>> app = create_app(pipe, config)  # then: ttalign.serve.http.run(app, "127.0.0.1", 8000)
```

and from any OpenAI client:

```py
>>> from openai import OpenAI
>>> client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
>>> options = {"ttalign": {"alignment": ["best_of_n:n=4,reward=shapes_soft"], "seed": 3}}
>>> client.images.generate(prompt="a red circle", extra_body=options).data[0].b64_json
```
"""

from __future__ import annotations

import ipaddress
import os

from .app import ServeConfig, check_api_key, create_app
from .policy import REQUEST_OPTIONS, RequestPolicy
from .protocol import APIError, ImageRequest, Limits, parse_request
from .worker import PipelineWorker, WorkerConfig


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (`localhost`, `127.0.0.0/8`, `::1`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(env: str) -> str | None:
    """The API key from the environment variable `env` (`None` when unset). An empty or blank key, or one holding
    whitespace, is refused (`ValueError`) rather than served without one; the key itself is never logged."""
    value = os.environ.get(env)
    if value is None:
        return None
    try:
        check_api_key(value)
    except ValueError as err:
        raise ValueError(f"The environment variable {env}: {err}") from None
    return value


def check_bind(host: str, api_key: str | None, env: str) -> None:
    """Refuses (`ValueError`) to listen beyond this machine without an API key."""
    if not is_loopback(host) and api_key is None:
        raise ValueError(
            f"Refusing to listen on {host!r} without an API key: set the environment variable {env} "
            "(or bind to 127.0.0.1)."
        )


__all__ = [
    "REQUEST_OPTIONS",
    "APIError",
    "ImageRequest",
    "Limits",
    "PipelineWorker",
    "RequestPolicy",
    "ServeConfig",
    "check_api_key",
    "WorkerConfig",
    "check_bind",
    "create_app",
    "is_loopback",
    "parse_request",
    "read_api_key",
]
