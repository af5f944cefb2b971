"""The shapes world's captions as yes/no questions with dependencies, from the exact grammar (no language model).

`shapes_questions("two red circles left of a square")`:

1. Is there a circle? (entity)
2. Are the circles red? (attribute, depends on 1)
3. Are there exactly two red circles? (count, depends on 1)
4. Is there a square? (entity)
5. Are the red circles left of the square? (relation, depends on 1 and 4)

Pass it to :class:`~ttalign.rewards.QuestionScore` as `questions=shapes_questions`. :func:`question_truths` answers
the same questions from the exact verifier's detected objects (the labels the shapes VQA model is trained on).
"""

from __future__ import annotations

from collections.abc import Callable

from ttalign.rewards.questions import Question

from .verifier import Detected, _as_object, _matches
from .world import COUNT_WORDS, Phrase, parse_caption, relation_holds


def _noun(phrase: Phrase, colored: bool = True) -> str:
    plural = "s" if phrase.count > 1 else ""
    return " ".join(filter(None, [phrase.color if colored else None, phrase.shape + plural]))


def _shape_only(phrase: Phrase) -> Phrase:
    return Phrase(count=1, color=None, shape=phrase.shape, exact=False)


def _questions(prompt: str) -> list[tuple[Question, Callable[[list[Detected]], bool]]]:
    """Each question of a caption with the check that answers it on detected objects."""
    spec = parse_caption(prompt)
    out: list[tuple[Question, Callable[[list[Detected]], bool]]] = []
    entities = []
    for phrase in spec.phrases:
        entity = len(out) + 1
        entities.append(entity)
        shape_only = _shape_only(phrase)
        out.append(
            (
                Question(entity, f"Is there a {phrase.shape}?", kind="entity"),
                lambda objects, p=shape_only: bool(_matches(objects, p)),
            )
        )
        if phrase.color:
            verb = "Are the" if phrase.count > 1 else "Is the"
            text = f"{verb} {_noun(phrase, colored=False)} {phrase.color}?"
            colored = Phrase(count=1, color=phrase.color, shape=phrase.shape, exact=False)
            out.append(
                (
                    Question(len(out) + 1, text, parents=(entity,), kind="attribute"),
                    lambda objects, p=colored: bool(_matches(objects, p)),
                )
            )
        if phrase.exact:
            text = f"Are there exactly {COUNT_WORDS[phrase.count]} {_noun(phrase)}?"
            out.append(
                (
                    Question(len(out) + 1, text, parents=(entity,), kind="count"),
                    lambda objects, p=phrase: len(_matches(objects, p)) == p.count,
                )
            )
    if spec.relation is not None:
        first, second = spec.phrases
        verb = "Are" if first.count > 1 else "Is"
        text = f"{verb} the {_noun(first)} {spec.relation} the {_noun(second)}?"

        def related(objects, a=first, b=second, relation=spec.relation) -> bool:
            return any(
                x is not y and relation_holds(_as_object(x), _as_object(y), relation)
                for x in _matches(objects, a)
                for y in _matches(objects, b)
            )

        out.append((Question(len(out) + 1, text, parents=tuple(entities), kind="relation"), related))
    return out


def shapes_questions(prompt: str) -> list[Question]:
    """The questions of a caption of the shapes grammar (`ValueError` for any other text): per phrase, whether its
    shape is there, its colour (depending on the shape) and its exact count (depending on the shape); and the
    relation (depending on both shapes)."""
    return [question for question, _ in _questions(prompt)]


def question_truths(objects: list[Detected], prompt: str) -> list[bool]:
    """The true answer to each of :func:`shapes_questions`' questions about an image, from the objects the exact
    verifier detected in it (:func:`ttalign.shapes.verifier.detect`), judged as the verifier judges its clauses."""
    return [check(objects) for _, check in _questions(prompt)]
