"""VLMJudge against a real local HTTP server that answers like an OpenAI-compatible vision model (no mocked client):
its answer's log-probabilities make P(yes) / (P(yes) + P(no)) the image's mean red channel."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

from ttalign.methods import BestOfN
from ttalign.rewards import QuestionScore, VLMJudge
from ttalign.rewards.judge import yes_no_probabilities
from ttalign.testing import get_tiny_pipeline

SERVER = os.path.join(os.path.dirname(__file__), "llm_server.py")


class Server:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, SERVER, *args], stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url.replace("/v1", "/stats")) as r:
            return json.load(r)

    def close(self):
        self.proc.terminate()
        self.proc.wait()


@pytest.fixture
def serve():
    started = []

    def start(*args):
        started.append(Server(*args))
        return started[-1]

    yield start
    for server in started:
        server.close()


def _reds(*levels: float) -> torch.Tensor:
    """Images whose red channel is `level` everywhere (8-bit exact)."""
    images = torch.full((len(levels), 3, 16, 16), 0.5)
    images[:, 0] = torch.tensor([round(v * 255) / 255 for v in levels])[:, None, None]
    return images


def test_the_judge_reads_yes_and_no_from_the_log_probabilities(serve):
    server = serve("--delay", "0.2")
    judge = VLMJudge(model="test-vlm", base_url=server.url, max_concurrency=3)
    levels = (0.2, 0.4, 0.6, 0.8, 0.25, 0.75)
    scores = judge(_reds(*levels), ["a red circle"] * 6)
    torch.testing.assert_close(scores, torch.tensor([round(v * 255) / 255 for v in levels]), atol=1e-4, rtol=0)
    assert [d["source"] for d in judge.last_details] == ["logprobs"] * 6
    # "Yes" and " yes" both count as yes
    assert judge.last_details[0]["p_yes"] == pytest.approx(0.2, abs=1e-3)
    stats = server.stats()
    assert stats["requests"] == 6 and 1 < stats["max_in_flight"] <= 3
    # the same images and questions again: answered from the cache, no request
    again = judge(_reds(*levels), ["a red circle"] * 6)
    torch.testing.assert_close(again, scores)
    assert server.stats()["requests"] == 6 and all(d["cached"] for d in judge.last_details)


def test_the_judge_retries_and_times_out(serve):
    flaky = serve("--mode", "flaky")
    judge = VLMJudge(model="test-vlm", base_url=flaky.url, max_retries=2, max_concurrency=1)
    torch.testing.assert_close(judge(_reds(0.4), ["x"]), torch.tensor([0.4]), atol=3e-3, rtol=0)
    assert flaky.stats()["requests"] == 2  # one failure, one retry
    slow = serve("--mode", "slow")
    judge = VLMJudge(model="test-vlm", base_url=slow.url, timeout=0.3, max_retries=0)
    with pytest.raises(RuntimeError, match="server failed"):
        judge(_reds(0.4), ["x"])


def test_the_judge_falls_back_to_the_written_answer(serve):
    server = serve("--mode", "nologprobs")
    judge = VLMJudge(model="test-vlm", base_url=server.url)
    with pytest.warns(UserWarning, match="no log-probabilities"):
        scores = judge(_reds(0.2, 0.9), ["a", "b"])
    torch.testing.assert_close(scores, torch.tensor([0.0, 1.0]))
    assert [d["source"] for d in judge.last_details] == ["text", "text"]
    strict = VLMJudge(model="test-vlm", base_url=server.url, fallback="error")
    with pytest.raises(RuntimeError, match="no log-probabilities"):
        strict(_reds(0.2), ["a"])


def test_the_judge_keeps_its_key_out_of_errors(serve, monkeypatch):
    server = serve("--key", "right-key")
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-wrong-456")
    judge = VLMJudge(model="test-vlm", base_url=server.url, api_key_env="TEST_JUDGE_KEY", max_retries=0)
    with pytest.raises(RuntimeError) as err:
        judge(_reds(0.5), ["a"])
    assert "sk-wrong-456" not in str(err.value) and "AuthenticationError" in str(err.value)
    monkeypatch.setenv("TEST_JUDGE_KEY", "right-key")
    torch.testing.assert_close(judge(_reds(0.5), ["a"]), torch.tensor([128 / 255]), atol=1e-4, rtol=0)


def test_the_judge_ranks_best_of_n_and_answers_questions(serve):
    server = serve()
    judge = VLMJudge(model="test-vlm", base_url=server.url)
    assert not judge.differentiable
    pipe = get_tiny_pipeline("ddim")
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        alignment=[BestOfN(reward=judge, n=4)],
    )
    scores = out.traces["best_of_n"]["scores"][0]
    assert out.rewards[0].item() == pytest.approx(scores.max().item())
    assert out.rewards[0].item() == pytest.approx(out.images[0, 0].mean().item(), abs=0.01)  # the reddest won
    decomposed = QuestionScore(judge, {"a red circle": ["Is there a circle?", "Is it red?"]})
    got = decomposed(_reds(0.6), ["a red circle"])
    torch.testing.assert_close(got, torch.tensor([0.6]), atol=3e-3, rtol=0)


def test_yes_no_probabilities_and_bad_settings():
    top = [{"token": " Yes", "logprob": -0.5}, {"token": "yes\n", "logprob": -2.0}, {"token": "NO", "logprob": -1.5}]
    p_yes, p_no = yes_no_probabilities(top)
    assert p_yes == pytest.approx(torch.tensor([-0.5, -2.0]).exp().sum().item())
    assert p_no == pytest.approx(torch.tensor(-1.5).exp().item())
    for kwargs, match in [
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"detail": "medium"}, "detail"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"fallback": "guess"}, "fallback"),
        ({"template": "Is it good?"}, "template"),
        ({"timeout": -1}, "timeout"),
    ]:
        with pytest.raises(ValueError, match=match):
            VLMJudge(**kwargs)


def test_the_server_preloads_a_judge_by_configuration_and_requests_only_name_it(serve):
    import httpx
    from test_serve import KEY
    from test_serve import Server as TTAlignServer

    vlm = serve()
    app = TTAlignServer("--allow", "best_of_n", "--reward", f"vlm_judge:model=test-vlm,base_url={vlm.url}")
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        listed = httpx.get(app.url + "/ttalign/methods", headers=headers).json()
        assert listed["rewards"] == ["vlm_judge"] and vlm.url not in json.dumps(listed)
        body = {"prompt": "a red circle", "ttalign": {"steps": 2, "alignment": ["best_of_n:n=2,reward=vlm_judge"]}}
        r = httpx.post(app.url + "/images/generations", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        assert vlm.stats()["requests"] == 2  # both candidates judged by the configured server
        for sneaky in ("vlm_judge:base_url=http://attacker.example/v1", "vlm_judge:model=gpt-4o"):
            body["ttalign"]["alignment"] = [f"best_of_n:n=2,reward={sneaky}"]
            r = httpx.post(app.url + "/images/generations", json=body, headers=headers, timeout=120)
            assert r.status_code == 400, r.text
        assert vlm.stats()["requests"] == 2
    finally:
        app.close()


def test_reward_specs_carry_the_factorys_options():
    from ttalign.rewards import load_reward, parse_reward_spec

    judge = load_reward("vlm_judge:model=m,base_url=http://127.0.0.1:1/v1,max_concurrency=2,cache=false")
    settings = (judge.model, judge.base_url, judge.max_concurrency, judge.cache)
    assert settings == ("m", "http://127.0.0.1:1/v1", 2, False)
    assert parse_reward_spec("shapes_soft") == ("shapes_soft", {})
    with pytest.raises(ValueError, match="Unknown reward 'nope'"):
        parse_reward_spec("nope:x=1")
    with pytest.raises(ValueError, match="key=value"):
        parse_reward_spec("vlm_judge:model")
    with pytest.raises(ValueError, match="Reward 'vlm_judge': .*colour"):
        load_reward("vlm_judge:colour=red")
