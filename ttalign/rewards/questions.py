"""Question-decomposed scores (TIFA / Davidsonian Scene Graph): a prompt becomes yes/no questions with dependencies,
a VQA model answers each, and the score is the dependency-aware mean.

TIFA: Hu et al. 2023, https://arxiv.org/abs/2303.11897. DSG: Cho et al. 2024, https://arxiv.org/abs/2310.18235. In
DSG a question whose parent was answered "no" counts as failed ("is the circle red?" cannot hold when there is no
circle); the score is the mean over questions after that zeroing.

Questions come from a user-given mapping, from a function (the shapes world's exact parser,
:func:`ttalign.shapes.questions.shapes_questions`), or from a chat model behind an OpenAI-compatible server
(:class:`LLMQuestions`, cached per prompt).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping

import torch

from ttalign.openai_compat import check_client_settings, openai_client, redact

from .base import Reward, reward_name


@dataclasses.dataclass(frozen=True)
class Question:
    """One yes/no question about an image: `id` (unique within its prompt, > 0), the question `text` (the expected
    answer is always yes), the ids of the questions it depends on (`parents`), and an optional `kind` ("entity",
    "attribute", "count", "relation", ...)."""

    id: int
    text: str
    parents: tuple[int, ...] = ()
    kind: str = ""

    def __post_init__(self):
        if not isinstance(self.id, int) or self.id < 1:
            raise ValueError(f"A question's id must be a positive integer, got {self.id!r}.")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"Question {self.id} has no text.")
        object.__setattr__(self, "parents", tuple(self.parents))


def check_questions(questions: list[Question], prompt: str) -> list[Question]:
    """Raises `ValueError` naming the prompt unless `questions` is a non-empty list of :class:`Question` with unique
    ids whose parents exist and come first (so the dependency graph has no cycle)."""
    if not questions:
        raise ValueError(f"No questions for the prompt {prompt!r}.")
    seen: set[int] = set()
    for q in questions:
        if not isinstance(q, Question):
            raise ValueError(f"Questions for {prompt!r} must be `Question`s, got {q!r}.")
        if q.id in seen:
            raise ValueError(f"Question id {q.id} appears twice for {prompt!r}.")
        missing = [p for p in q.parents if p not in seen]
        if missing:
            raise ValueError(
                f"Question {q.id} ({q.text!r}) of {prompt!r} depends on {missing}, which do not come before it."
            )
        seen.add(q.id)
    return list(questions)


def dependency_scores(answers: torch.Tensor, questions: list[Question]) -> torch.Tensor:
    """Each question's score after its dependencies: `s_i = a_i * min_{j in parents(i)} s_j` (`a_i` without
    parents), for answers `[B, Q]` in `[0, 1]` in the order of `questions`. With 0/1 answers this is DSG's rule: a
    question fails when a question it depends on failed. Differentiable in the answers."""
    index = {q.id: k for k, q in enumerate(questions)}
    scores: list[torch.Tensor] = []
    for k, q in enumerate(questions):
        s = answers[:, k]  # [B]
        if q.parents:
            parents = torch.stack([scores[index[p]] for p in q.parents], dim=1)  # [B, P]
            s = s * parents.min(dim=1).values
        scores.append(s)
    return torch.stack(scores, dim=1)  # [B, Q]


def _as_questions(items, prompt: str) -> list[Question]:
    """A user's questions: `Question`s, or plain strings (independent questions numbered from 1)."""
    return check_questions(
        [q if isinstance(q, Question) else Question(id=k + 1, text=str(q)) for k, q in enumerate(items)], prompt
    )


class QuestionScore(Reward):
    """The dependency-aware mean of a VQA model's answers to a prompt's yes/no questions (TIFA / DSG,
    https://arxiv.org/abs/2310.18235).

    Args:
        vqa: any answerer with `answer_probability(images, questions) -> Tensor[B]` in `[0, 1]`: a :class:`VQAScore`
            (differentiable), a :class:`VLMJudge`, or the shapes VQA model.
        questions: where a prompt's questions come from: a mapping `prompt -> [Question or str, ...]`, a function
            `prompt -> [Question, ...]` (e.g. :func:`ttalign.shapes.questions.shapes_questions`), or an
            :class:`LLMQuestions`. Questions are built once per prompt and cached.
        threshold (`float`, *optional*): answers at or above it count as yes (1) and below as no (0), DSG's binary
            scoring (not differentiable); by default the answer probabilities are used as they are.

    `last_details` holds, for every image of the last call, each question with its answer and its score after
    dependencies, and the score; best-of-N and particle steering, which score the images they return, copy those
    images' entries into `out.traces[...]["reward_details"]`, so a user sees which part of the prompt failed.

    Example:

    ```py
    >>> from ttalign.rewards import Question, QuestionScore, VQAScore
    >>> vqa = VQAScore.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
    >>> questions = {"a red circle left of a square": [
    ...     Question(1, "Is there a circle?"), Question(2, "Is the circle red?", parents=(1,)),
    ...     Question(3, "Is there a square?"), Question(4, "Is the circle left of the square?", parents=(1, 3))]}
    >>> reward = QuestionScore(vqa, questions)
    >>> reward(images, ["a red circle left of a square"] * len(images)), reward.last_details[0]
    ```
    """

    native_range = (0.0, 1.0)

    def __init__(self, vqa, questions, threshold: float | None = None):
        super().__init__()
        if not callable(getattr(vqa, "answer_probability", None)):
            raise ValueError(
                "QuestionScore needs an answerer with `answer_probability(images, questions)`, got "
                f"{reward_name(vqa)}."
            )
        if not (isinstance(questions, Mapping) or callable(questions)):
            raise ValueError(
                "QuestionScore's questions must be a mapping prompt -> questions or a function prompt -> questions, "
                f"got {type(questions).__name__}."
            )
        if threshold is not None and not 0 < threshold < 1:
            raise ValueError(f"QuestionScore's threshold must lie in (0, 1), got {threshold!r}.")
        self.vqa, self.questions, self.threshold = vqa, questions, threshold
        self.differentiable = threshold is None and bool(getattr(vqa, "differentiable", False))
        self._cache: dict[str, list[Question]] = {}
        self.last_details: list[dict] = []

    def questions_for(self, prompt: str) -> list[Question]:
        """The prompt's questions (built once, then cached); `ValueError` naming the prompt if there are none."""
        if prompt not in self._cache:
            if isinstance(self.questions, Mapping):
                if prompt not in self.questions:
                    raise ValueError(f"QuestionScore has no questions for the prompt {prompt!r}.")
                built = _as_questions(self.questions[prompt], prompt)
            else:
                built = _as_questions(self.questions(prompt), prompt)
            self._cache[prompt] = built
        return self._cache[prompt]

    def check_prompts(self, prompts: list[str]) -> None:
        for prompt in dict.fromkeys(prompts):
            self.questions_for(prompt)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        per_image = [self.questions_for(p) for p in prompts]
        rows = [(i, q) for i, qs in enumerate(per_image) for q in qs]  # one VQA query per (image, question)
        index = torch.tensor([i for i, _ in rows], device=images.device)
        answers = self.vqa.answer_probability(images[index], [q.text for _, q in rows])  # [sum Q]
        answers = answers.to(images.device).float()
        if self.threshold is not None:
            answers = (answers.detach() >= self.threshold).float()
        scores, details, start = [], [], 0
        for qs in per_image:
            a = answers[start : start + len(qs)]  # [Q]
            start += len(qs)
            s = dependency_scores(a[None], qs)[0]  # [Q]
            scores.append(s.mean())
            details.append(
                {
                    "score": s.mean().item(),
                    "questions": [
                        {
                            "id": q.id,
                            "question": q.text,
                            "parents": list(q.parents),
                            "kind": q.kind,
                            "answer": float(a_k),
                            "score": float(s_k),
                        }
                        for q, a_k, s_k in zip(qs, a.detach().tolist(), s.detach().tolist())
                    ],
                }
            )
        self.last_details = details
        return torch.stack(scores)


# --- questions from a chat model ------------------------------------------------------------------------------

#: DSG's three steps in one request: atomic yes/no questions, each with the ids it depends on.
QUESTION_SYSTEM_PROMPT = (
    "You turn a text-to-image prompt into atomic yes/no questions that a person answers by looking at an image "
    "generated from it. Ask first about each entity, then about its attributes, counts and relations. Every question "
    "must be answered 'yes' by a faithful image. A question depends on another when it cannot be true unless the "
    "other is (an attribute depends on its entity; a relation on both entities). Answer with one question per line, "
    "as `id | question | ids it depends on, comma-separated, or 0 for none`, ids counting from 1, nothing else."
)

_LINE = re.compile(r"^\s*(\d+)\s*\|\s*(.+?)\s*\|\s*([\d,\s]*)\s*$")


def parse_question_lines(text: str, prompt: str) -> list[Question]:
    """Reads `id | question | parents` lines (parents `0` or empty for none); other lines are ignored. Raises
    `ValueError` naming the prompt when no line parses or the dependencies are inconsistent."""
    questions = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        parents = tuple(int(p) for p in re.split(r"[,\s]+", match.group(3).strip()) if p and int(p) != 0)
        questions.append(Question(id=int(match.group(1)), text=match.group(2), parents=parents))
    if not questions:
        raise ValueError(f"The model wrote no question in the `id | question | parents` form for {prompt!r}.")
    return check_questions(questions, prompt)


@dataclasses.dataclass(eq=False)
class LLMQuestions:
    """Questions for a prompt from a chat model behind an OpenAI-compatible server (DSG-style: atomic yes/no
    questions with dependencies, in one request), cached per prompt in memory and, with `cache_file`, in a JSON file
    that later runs read.

    Args:
        model (`str`): the model name the server knows.
        base_url (`str`, *optional*): the server (default: `OPENAI_BASE_URL`, else OpenAI's).
        api_key_env (`str`): the environment variable holding the key (read per request, never logged).
        system_prompt (`str`): the instruction (:data:`QUESTION_SYSTEM_PROMPT`).
        cache_file (`str`, *optional*): a JSON file `prompt -> questions`, read at the first call and rewritten
            (atomically) after each new prompt.
        temperature (`float`), timeout (`float`, seconds), max_retries (`int`).

    A failed request raises `RuntimeError` naming the prompt and the server's error (with the key redacted).
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str = QUESTION_SYSTEM_PROMPT
    cache_file: str | None = None
    temperature: float = 0.0
    timeout: float = 60.0
    max_retries: int = 2
    _cache: dict | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_client_settings("LLMQuestions", self.timeout, self.max_retries)

    def _load(self) -> dict:
        if self._cache is None:
            self._cache = {}
            if self.cache_file and os.path.exists(self.cache_file):
                with open(self.cache_file, encoding="utf-8") as f:
                    self._cache = json.load(f)
        return self._cache

    def _save(self) -> None:
        if not self.cache_file:
            return
        tmp = f"{self.cache_file}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._cache, f, indent=1)
        os.replace(tmp, self.cache_file)

    def __call__(self, prompt: str) -> list[Question]:
        cache = self._load()
        if prompt not in cache:
            client = openai_client(self.base_url, self.api_key_env, self.timeout, self.max_retries, "LLMQuestions")
            try:
                reply = client.chat.completions.create(
                    model=self.model,
                    messages=[
                        {"role": "system", "content": self.system_prompt},
                        {"role": "user", "content": f"Prompt: {prompt}"},
                    ],
                    temperature=self.temperature,
                )
            except Exception as err:  # noqa: BLE001 - any client error, reported with the key redacted
                raise RuntimeError(
                    f"LLMQuestions: the server failed for {prompt!r} ({type(err).__name__}: "
                    f"{redact(str(err), self.api_key_env)[:200]})."
                ) from None
            questions = parse_question_lines(reply.choices[0].message.content or "", prompt)
            cache[prompt] = [dataclasses.asdict(q) for q in questions]
            self._save()
        try:
            return check_questions([Question(**{**q, "parents": tuple(q["parents"])}) for q in cache[prompt]], prompt)
        except (TypeError, KeyError) as err:
            warnings.warn(f"LLMQuestions: dropping a malformed cache entry for {prompt!r} ({err}).", stacklevel=2)
            del cache[prompt]
            return self(prompt)
