"""The client of OpenAI-compatible chat servers (OpenAI, vLLM, SGLang, llama.cpp, Ollama), shared by prompt
rewriting, LLM question generation and VLM judges.

The server's URL, the model and the environment variable that holds the key are configuration: they are set when
the method or reward is built, never by a request to ttalign's server. The key is read when a request is made and
never logged (:func:`redact` removes it from error messages).
"""

from __future__ import annotations

import os

#: Bounds of the client's settings: a request gives up within `timeout * (max_retries + 1)`.
MAX_TIMEOUT_S = 600.0
MAX_RETRIES = 10


def check_client_settings(owner: str, timeout, max_retries) -> None:
    """Raises `ValueError` naming `owner` unless `0 < timeout <= MAX_TIMEOUT_S` and `0 <= max_retries <= MAX_RETRIES`
    (an integer)."""
    if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_TIMEOUT_S):
        raise ValueError(f"{owner} needs 0 < timeout <= {MAX_TIMEOUT_S:g} seconds, got {timeout!r}.")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise ValueError(f"{owner} needs an integer max_retries, got {max_retries!r}.")
    if not 0 <= max_retries <= MAX_RETRIES:
        raise ValueError(f"{owner} needs 0 <= max_retries <= {MAX_RETRIES}, got {max_retries}.")


def openai_client(base_url: str | None, api_key_env: str, timeout: float, max_retries: int, owner: str):
    """An `openai.OpenAI` client for `base_url` (default: `OPENAI_BASE_URL`, else OpenAI's), keyed from the
    environment variable `api_key_env` (local servers accept any key); `ImportError` saying what to install."""
    try:
        from openai import OpenAI
    except ImportError:
        raise ImportError(f"{owner} needs the openai client: pip install 'ttalign[llm]'.") from None
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    key = os.environ.get(api_key_env) or "not-needed"
    return OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)


def redact(message: str, api_key_env: str) -> str:
    """`message` with the key held in `api_key_env` (if any) replaced by `***`."""
    key = os.environ.get(api_key_env)
    return message.replace(key, "***") if key else message
