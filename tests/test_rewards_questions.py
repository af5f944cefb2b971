"""Question-decomposed scores: the dependency rule against DSG's, the questions' sources (a mapping, the shapes
parser, a chat model behind a real local HTTP server) and the answers kept in the call's trace."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

from ttalign.methods import BestOfN
from ttalign.rewards import LLMQuestions, Question, QuestionScore, VQAScore
from ttalign.rewards.questions import dependency_scores, parse_question_lines
from ttalign.shapes.questions import shapes_questions
from ttalign.testing import get_tiny_pipeline, save_tiny_vlm

SERVER = os.path.join(os.path.dirname(__file__), "llm_server.py")


class ColourAnswerer:
    """Answers by the image's mean colour: "red" questions by the red channel, everything else by the green one."""

    differentiable = True

    def __init__(self):
        self.asked: list[str] = []

    def answer_probability(self, images, questions):
        self.asked += questions
        red, green = images[:, 0].mean((1, 2)), images[:, 1].mean((1, 2))  # [B]
        return torch.stack([r if "red" in q else g for r, g, q in zip(red, green, questions)])


def _solid(rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 8, 8)


def test_dependency_scores_follow_the_published_rule():
    questions = [Question(1, "circle?"), Question(2, "red circle?", parents=(1,)), Question(3, "left?", (1, 2))]
    answers = torch.tensor([[0.9, 0.2, 0.8], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    got = dependency_scores(answers, questions)
    # s1 = a1; s2 = a2 * s1; s3 = a3 * min(s1, s2)
    expected = torch.tensor([[0.9, 0.18, 0.8 * 0.18], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(got, expected)
    # with 0/1 answers, DSG: a question whose parent failed counts 0; the score is the mean
    assert got[1].mean().item() == 0.0 and got[2].mean().item() == pytest.approx(2 / 3)


def test_question_score_keeps_every_answer_and_uses_the_threshold():
    answerer = ColourAnswerer()
    questions = {"a red circle": [Question(1, "Is there a circle?"), Question(2, "Is the circle red?", (1,))]}
    reward = QuestionScore(answerer, questions)
    assert reward.differentiable
    images = torch.stack([_solid((0.8, 0.5, 0.0)), _solid((0.2, 0.9, 0.0))])
    scores = reward(images, ["a red circle"] * 2)
    # image 0: circle 0.5, red 0.8 * 0.5; image 1: circle 0.9, red 0.2 * 0.9
    torch.testing.assert_close(scores, torch.tensor([(0.5 + 0.4) / 2, (0.9 + 0.18) / 2]))
    detail = reward.last_details[0]["questions"]
    assert [d["question"] for d in detail] == ["Is there a circle?", "Is the circle red?"]
    assert detail[1]["answer"] == pytest.approx(0.8) and detail[1]["score"] == pytest.approx(0.4)
    assert detail[1]["parents"] == [1]
    binary = QuestionScore(answerer, questions, threshold=0.5)
    assert not binary.differentiable
    torch.testing.assert_close(binary(images, ["a red circle"] * 2), torch.tensor([1.0, 0.5]))


def test_question_score_refuses_what_it_cannot_score():
    reward = QuestionScore(ColourAnswerer(), {"a red circle": ["Is there a circle?"]})
    with pytest.raises(ValueError, match="no questions for the prompt 'a blue square'"):
        reward.check_prompts(["a blue square"])
    with pytest.raises(ValueError, match="answer_probability"):
        QuestionScore(lambda images, prompts: images.mean((1, 2, 3)), {})
    with pytest.raises(ValueError, match="depends on \\[2\\]"):
        QuestionScore(ColourAnswerer(), {"p": [Question(1, "a?", parents=(2,)), Question(2, "b?")]})(
            torch.rand(1, 3, 8, 8), ["p"]
        )
    with pytest.raises(ValueError, match="threshold"):
        QuestionScore(ColourAnswerer(), {}, threshold=1.5)


def test_shapes_questions_follow_the_grammar():
    got = shapes_questions("two red circles left of a square")
    assert [(q.id, q.text, q.parents, q.kind) for q in got] == [
        (1, "Is there a circle?", (), "entity"),
        (2, "Are the circles red?", (1,), "attribute"),
        (3, "Are there exactly two red circles?", (1,), "count"),
        (4, "Is there a square?", (), "entity"),
        (5, "Are the red circles left of the square?", (1, 4), "relation"),
    ]
    assert [q.text for q in shapes_questions("a blue triangle")] == ["Is there a triangle?", "Is the triangle blue?"]
    with pytest.raises(ValueError, match="not in the shapes-world grammar"):
        shapes_questions("a cat on a sofa")


def test_best_of_n_keeps_the_winners_answers_in_the_trace():
    pipe = get_tiny_pipeline("ddim")
    reward = QuestionScore(ColourAnswerer(), shapes_questions)
    prompts = ["a red circle", "two green squares"]
    out = pipe(
        prompts,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        alignment=[BestOfN(reward=reward, n=3, reward_batch_size=4)],
    )
    trace = out.traces["best_of_n"]
    details = trace["reward_details"]
    assert len(details) == 2
    for k, (detail, prompt) in enumerate(zip(details, prompts)):
        assert [q["question"] for q in detail["questions"]] == [q.text for q in shapes_questions(prompt)]
        assert detail["score"] == pytest.approx(out.rewards[k].item(), abs=1e-6)
        assert detail["score"] == pytest.approx(trace["scores"][k].max().item(), abs=1e-6)


def test_question_score_on_a_vqa_model_is_differentiable(tmp_path):
    vqa = VQAScore.from_pretrained(save_tiny_vlm(str(tmp_path), "qwen2_5_vl"))
    reward = QuestionScore(vqa, shapes_questions)
    assert reward.differentiable
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    scores = reward(images, ["a red circle left of a square", "two blue triangles"])
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # each question was answered on its own image
    with torch.no_grad():
        first = vqa.answer_probability(images[:1], ["Is the circle red?"])
    assert reward.last_details[0]["questions"][1]["answer"] == pytest.approx(first.item(), rel=1e-4)


# --- questions from a chat model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen([sys.executable, SERVER], stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{int(proc.stdout.readline())}/v1"
    yield url
    proc.terminate()
    proc.wait()


def _requests(url) -> int:
    with urllib.request.urlopen(url.replace("/v1", "/stats")) as r:
        return json.load(r)["requests"]


def test_llm_questions_are_parsed_cached_and_saved(server, tmp_path):
    cache = tmp_path / "questions.json"
    ask = LLMQuestions(model="test", base_url=server, cache_file=str(cache))
    before = _requests(server)
    got = ask("a red circle and a square")
    assert [(q.text, q.parents) for q in got] == [
        ("Is there a circle?", ()),
        ("Is the circle red?", (1,)),
        ("Is there a square?", ()),
    ]
    assert ask("a red circle and a square") == got
    assert _requests(server) == before + 1  # the second call was answered from memory
    fresh = LLMQuestions(model="test", base_url=server, cache_file=str(cache))
    assert fresh("a red circle and a square") == got
    assert _requests(server) == before + 1  # and a new object reads the file
    reward = QuestionScore(ColourAnswerer(), ask)
    scores = reward(torch.stack([_solid((0.6, 0.3, 0.0))]), ["a red circle and a square"])
    torch.testing.assert_close(scores, torch.tensor([(0.3 + 0.6 * 0.3 + 0.3) / 3]))


def test_llm_questions_report_a_failing_server_without_the_key(monkeypatch):
    proc = subprocess.Popen([sys.executable, SERVER, "--mode", "fail"], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}/v1"
        monkeypatch.setenv("TEST_QUESTIONS_KEY", "sk-secret-123")
        ask = LLMQuestions(model="test", base_url=url, api_key_env="TEST_QUESTIONS_KEY", max_retries=0)
        with pytest.raises(RuntimeError, match="server failed for 'a circle'") as err:
            ask("a circle")
        assert "sk-secret-123" not in str(err.value)
    finally:
        proc.terminate()
        proc.wait()
    with pytest.raises(ValueError, match="no question"):
        parse_question_lines("Sure! Here you go.", "a circle")
    with pytest.raises(ValueError, match="timeout"):
        LLMQuestions(timeout=0)
