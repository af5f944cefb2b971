"""A vision-language judge behind any OpenAI-compatible chat server (vLLM, SGLang, a hosted API).

The image goes as a PNG data URL in an `image_url` part of the user message, with a yes/no question (VQAScore's
template by default); the reply is one token with its `top_logprobs`, and the score is
`P(yes) / (P(yes) + P(no))`, each the sum of `exp(logprob)` over the top tokens that read "yes" (or "no") once
stripped and lower-cased. Where the server returns no log-probabilities, the written answer is used (yes = 1,
no = 0) with a warning; where neither answer appears at all, the image scores 0.5 and the trace says "missing".
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ttalign.openai_compat import check_client_settings, openai_client, redact

from .base import Reward
from .vqa import DEFAULT_TEMPLATE

#: Scores kept in memory per judge with `cache=True` (the oldest is dropped first).
CACHE_SIZE = 4096
FALLBACKS = ("text", "error")


def png_data_url(image: torch.Tensor) -> str:
    """`[3, H, W]` in `[0, 1]` -> `data:image/png;base64,...` (8-bit, lossless)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def yes_no_probabilities(top_logprobs) -> tuple[float, float]:
    """`(P(yes), P(no))` from one position's `top_logprobs` (objects or dicts with `token` and `logprob`): the sum of
    `exp(logprob)` over tokens that read "yes" (or "no") once stripped and lower-cased."""
    p_yes = p_no = 0.0
    for entry in top_logprobs or []:
        token = entry["token"] if isinstance(entry, dict) else entry.token
        logprob = entry["logprob"] if isinstance(entry, dict) else entry.logprob
        word = (token or "").strip().lower()
        if word == "yes":
            p_yes += math.exp(logprob)
        elif word == "no":
            p_no += math.exp(logprob)
    return p_yes, p_no


class VLMJudge(Reward):
    """Scores `(image, prompt)` by a vision-language model behind an OpenAI-compatible chat server as
    `P(yes) / (P(yes) + P(no))` from the log-probabilities of its one-token answer to
    `template.format(prompt)` (VQAScore's question by default).

    Args:
        model (`str`): the model name the server knows (e.g. `Qwen/Qwen2.5-VL-7B-Instruct` under vLLM).
        base_url (`str`, *optional*): the server, e.g. `http://127.0.0.1:8000/v1` (default: `OPENAI_BASE_URL`, else
            OpenAI's).
        api_key_env (`str`): the environment variable holding the key (read per request, never logged).
        template (`str`): the question, `{}` standing for the prompt.
        top_logprobs (`int`, 1-20): alternatives returned at the answer's position.
        detail (`str`): the `image_url` detail, `"auto"`, `"low"` or `"high"`.
        max_concurrency (`int`): requests in flight at once.
        timeout (`float`, seconds), max_retries (`int`): per request, as the openai client does them.
        cache (`bool`): identical (image, question) pairs are answered from memory (the last `CACHE_SIZE`).
        fallback (`str`): where a reply carries no log-probabilities, `"text"` scores the written answer (yes 1, no
            0; anything else 0.5) with a warning, `"error"` raises.
        extra_body (`dict`, *optional*): sent with every request, e.g. `{"chat_template_kwargs": {"enable_thinking":
            False}}` for a reasoning model under vLLM.

    Not differentiable. `last_details` holds, per image of the last call, `P(yes)`, `P(no)`, the score and where it
    came from (`"logprobs"`, `"text"`, `"missing"`). A request that still fails after its retries raises
    `RuntimeError` naming the error, with the key redacted.

    Example:

    ```py
    >>> from ttalign.rewards import VLMJudge
    >>> judge = VLMJudge(model="Qwen/Qwen2.5-VL-7B-Instruct", base_url="http://127.0.0.1:8000/v1")
    >>> judge(images, ["two red circles"] * len(images))
    ```
    """

    differentiable = False
    native_range = (0.0, 1.0)
    license = "the judged model's and the server's terms"

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        template: str = DEFAULT_TEMPLATE,
        top_logprobs: int = 20,
        detail: str = "auto",
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 2,
        cache: bool = True,
        fallback: str = "text",
        extra_body: dict | None = None,
    ):
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"VLMJudge's template must contain '{{}}' where the prompt goes, got {template!r}.")
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 1 <= top_logprobs <= 20:
            raise ValueError(f"VLMJudge needs 1 <= top_logprobs <= 20 (the API's bound), got {top_logprobs!r}.")
        if detail not in ("auto", "low", "high"):
            raise ValueError(f"VLMJudge's detail must be 'auto', 'low' or 'high', got {detail!r}.")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"VLMJudge needs max_concurrency >= 1, got {max_concurrency!r}.")
        if fallback not in FALLBACKS:
            raise ValueError(f"VLMJudge's fallback must be one of {FALLBACKS}, got {fallback!r}.")
        check_client_settings("VLMJudge", timeout, max_retries)
        self.model, self.base_url, self.api_key_env, self.template = model, base_url, api_key_env, template
        self.top_logprobs, self.detail, self.max_concurrency = top_logprobs, detail, max_concurrency
        self.timeout, self.max_retries, self.cache, self.fallback = timeout, max_retries, cache, fallback
        self.extra_body = dict(extra_body or {})
        self._memory: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._warned_text = False
        self.last_details: list[dict] = []

    @property
    def name(self) -> str:
        return f"VLMJudge({self.model})"

    def question_for(self, prompt: str) -> str:
        return self.template.format(prompt)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.answer_probability(images, [self.question_for(p) for p in prompts])

    def answer_probability(self, images: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """The judge's `P(yes) / (P(yes) + P(no))` for each (image, question), `[B]` float32 on the images' device."""
        if len(questions) != images.shape[0]:
            raise ValueError(f"Got {len(questions)} questions for {images.shape[0]} images.")
        urls = [png_data_url(image) for image in images]
        client = openai_client(self.base_url, self.api_key_env, self.timeout, self.max_retries, "VLMJudge")
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(urls)) or 1) as pool:
            details = list(pool.map(lambda uq: self._judge(client, *uq), zip(urls, questions)))
        if not self._warned_text and any(d["source"] == "text" for d in details):
            self._warned_text = True
            warnings.warn(
                f"VLMJudge: {self.model} returned no log-probabilities; scoring the written answer (yes 1, no 0).",
                stacklevel=3,
            )
        self.last_details = details
        return torch.tensor([d["score"] for d in details], dtype=torch.float32, device=images.device)

    def _judge(self, client, url: str, question: str) -> dict:
        key = (hashlib.sha256(url.encode()).hexdigest(), question, self.model, self.base_url)
        if self.cache:
            with self._lock:
                if key in self._memory:
                    self._memory.move_to_end(key)
                    return dict(self._memory[key], cached=True)
        detail = self._ask(client, url, question)
        if self.cache:
            with self._lock:
                self._memory[key] = detail
                while len(self._memory) > CACHE_SIZE:
                    self._memory.popitem(last=False)
        return dict(detail, cached=False)

    def _ask(self, client, url: str, question: str) -> dict:
        content = [
            {"type": "image_url", "image_url": {"url": url, "detail": self.detail}},
            {"type": "text", "text": question},
        ]
        try:
            reply = client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": content}],
                max_completion_tokens=1,
                temperature=0.0,
                logprobs=True,
                top_logprobs=self.top_logprobs,
                **({"extra_body": self.extra_body} if self.extra_body else {}),
            )
        except Exception as err:  # noqa: BLE001 - any client error, reported with the key redacted
            raise RuntimeError(
                f"VLMJudge: the server failed ({type(err).__name__}: {redact(str(err), self.api_key_env)[:200]})."
            ) from None
        choice = reply.choices[0]
        positions = getattr(getattr(choice, "logprobs", None), "content", None) or []
        if positions:
            p_yes, p_no = yes_no_probabilities(positions[0].top_logprobs)
            if p_yes + p_no > 0:
                return {"p_yes": p_yes, "p_no": p_no, "score": p_yes / (p_yes + p_no), "source": "logprobs"}
        text = (choice.message.content or "").strip().lower()
        if not positions and self.fallback == "error":
            raise RuntimeError(
                f"VLMJudge: {self.model} returned no log-probabilities (is it a reasoning model, or does the server "
                "cap `top_logprobs`?); pass fallback='text' to score the written answer."
            )
        word = text.split()[0].strip(".,!:;\"'") if text else ""
        if word in ("yes", "no") and not positions:
            return {"p_yes": None, "p_no": None, "score": float(word == "yes"), "source": "text"}
        return {"p_yes": None, "p_no": None, "score": 0.5, "source": "missing"}
