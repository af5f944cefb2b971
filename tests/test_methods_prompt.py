"""Prompt rewriting against a real local OpenAI-compatible HTTP server process, and Promptist on a tiny GPT-2."""

import json
import logging
import os
import subprocess
import sys
import urllib.request
import warnings

import numpy as np
import pytest
import torch

from ttalign.methods import Promptist, PromptRewrite
from ttalign.testing import Redness, get_tiny_pipeline, save_tiny_gpt2

SERVER = os.path.join(os.path.dirname(__file__), "llm_server.py")


def _start(*args):
    proc = subprocess.Popen([sys.executable, SERVER, *args], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def _requests(url):
    with urllib.request.urlopen(url.replace("/v1", "/stats")) as r:
        return json.load(r)["requests"]


@pytest.fixture(scope="module")
def server():
    proc, url = _start()
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_pipeline("ddim")


def _call(pipe, prompt, alignment=()):
    return pipe(
        [prompt],
        num_inference_steps=3,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        alignment=list(alignment),
    )


def test_rewrite_through_the_server_and_cache(pipe, server):
    method = PromptRewrite(model="local", base_url=server)
    out = _call(pipe, "a red cat", [method])
    trace = out.traces["prompt_rewrite"][0]
    assert trace["original"] == "a red cat" and trace["chosen"] == "a red cat, variant 0"
    assert np.abs(out.images - _call(pipe, "a red cat, variant 0").images).max() < 1e-6  # the pipeline used it
    before = _requests(server)
    _call(pipe, "a red cat", [method])
    assert _requests(server) == before  # answered from the cache
    _call(pipe, "a red cat", [PromptRewrite(model="local", base_url=server, cache=False)])
    assert _requests(server) == before + 1


def test_reward_in_the_loop_keeps_the_best_prompt(pipe, server):
    reward = Redness()
    method = PromptRewrite(model="local", base_url=server, candidates=3, rounds=2, reward=reward)
    out = _call(pipe, "a cat", [method])
    trace = out.traces["prompt_rewrite"][0]
    prompts = [p for p, _ in trace["candidates"]]
    assert prompts[0] == "a cat" and len(prompts) == len(set(prompts)) >= 4  # the user's prompt is a candidate
    best_prompt, best_score = max(trace["candidates"], key=lambda x: x[1])
    assert trace["chosen"] == best_prompt
    assert best_score == max(s for _, s in trace["candidates"]) and len({s for _, s in trace["candidates"]}) > 1
    assert np.abs(out.images - _call(pipe, best_prompt).images).max() < 1e-6  # the call rendered the chosen prompt
    assert out.traces["compute"]["reward_calls"] >= 2 and out.traces["compute"]["nfe"] > 3


def test_reward_loop_shows_progress(server, capsys):
    pipe = get_tiny_pipeline("ddim", disable_progress_bar=False)
    method = PromptRewrite(model="local", base_url=server, candidates=2, rounds=3, reward=Redness(), cache=False)
    pipe(["a cat", "a dog"], num_inference_steps=2, output_type="np", alignment=[method])
    assert "6/6" in capsys.readouterr().err  # two prompts x three rounds, then the denoising bar (2/2)


@pytest.mark.parametrize("mode", ["fail", "slow"])
def test_server_failure_falls_back_to_the_prompt(pipe, mode):
    proc, url = _start("--mode", mode)
    try:
        method = PromptRewrite(model="local", base_url=url, timeout=0.5, max_retries=1)
        with pytest.warns(UserWarning, match="the server failed"):
            out = _call(pipe, "a red cat", [method])
        assert out.traces["prompt_rewrite"][0]["chosen"] == "a red cat"
        assert np.abs(out.images - _call(pipe, "a red cat").images).max() < 1e-6
        assert _requests(url) == 2  # one retry
    finally:
        proc.terminate()
        proc.wait()


def test_api_key_is_sent_and_never_logged(pipe, monkeypatch, caplog):
    proc, url = _start("--key", "right-key-123")
    try:
        monkeypatch.setenv("TTALIGN_TEST_KEY", "right-key-123")
        ok = _call(pipe, "a red cat", [PromptRewrite(model="local", base_url=url, api_key_env="TTALIGN_TEST_KEY")])
        assert ok.traces["prompt_rewrite"][0]["chosen"] == "a red cat, variant 0"
        monkeypatch.setenv("TTALIGN_TEST_KEY", "wrong-key-456")
        caplog.set_level(logging.DEBUG)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bad = _call(
                pipe,
                "a red cat",
                [PromptRewrite(model="local", base_url=url, api_key_env="TTALIGN_TEST_KEY", max_retries=0)],
            )
        assert bad.traces["prompt_rewrite"][0]["chosen"] == "a red cat"
        messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
        assert any("AuthenticationError" in m for m in messages)
        assert not any("wrong-key-456" in m for m in messages)
    finally:
        proc.terminate()
        proc.wait()


def test_promptist_uses_the_reference_generation_settings(pipe, tmp_path):
    folder = save_tiny_gpt2(str(tmp_path / "gpt2"))
    method = Promptist(model=folder, tokenizer=folder, max_new_tokens=12)
    assert (method.num_beams, method.length_penalty) == (8, -1.0)
    model, tokenizer = method.load()
    text = "a red cat Rephrase:"
    ids = tokenizer(text, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    reference = model.generate(
        ids,
        do_sample=False,
        max_new_tokens=12,
        num_beams=8,
        num_return_sequences=8,
        eos_token_id=eos,
        pad_token_id=eos,
        length_penalty=-1.0,
    )
    expected = tokenizer.batch_decode(reference, skip_special_tokens=True)[0].replace(text, "").strip()
    out = _call(pipe, "a red cat", [method])
    assert out.traces["promptist"] == [("a red cat", expected or "a red cat")]
    assert np.abs(out.images - _call(pipe, expected or "a red cat").images).max() < 1e-6


def test_prompt_methods_on_sdxl(server, tmp_path):
    """The reward loop renders candidates through the SDXL family (two text encoders, pooled and size conditioning);
    both methods hand the chosen prompt to SDXL's call."""
    from ttalign.testing import get_tiny_sdxl_pipeline

    pipe = get_tiny_sdxl_pipeline("ddim")
    method = PromptRewrite(model="local", base_url=server, candidates=2, rounds=2, reward=Redness())
    out = _call(pipe, "a cat", [method])
    trace = out.traces["prompt_rewrite"][0]
    best_prompt, best_score = max(trace["candidates"], key=lambda x: x[1])
    assert trace["chosen"] == best_prompt and len({s for _, s in trace["candidates"]}) > 1
    assert np.abs(out.images - _call(pipe, best_prompt).images).max() < 1e-6
    folder = save_tiny_gpt2(str(tmp_path / "gpt2"))
    rewritten = _call(pipe, "a red cat", [Promptist(model=folder, tokenizer=folder, max_new_tokens=6)])
    ((_, new_prompt),) = rewritten.traces["promptist"]
    assert np.abs(rewritten.images - _call(pipe, new_prompt).images).max() < 1e-6


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompt_methods_on_flow_families(server, tmp_path, family):
    """The reward loop renders candidates through the SD3 / FLUX families (flow matching, the call's schedule,
    FLUX's packed latents); both methods hand the chosen prompt to the call."""
    from ttalign.testing import get_tiny_flux_pipeline, get_tiny_sd3_pipeline

    pipe = get_tiny_sd3_pipeline(shift=3.0) if family == "sd3" else get_tiny_flux_pipeline(guidance_embeds=True)

    def call(prompt, alignment=()):
        return pipe(
            [prompt],
            num_inference_steps=3,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            alignment=list(alignment),
        )

    method = PromptRewrite(model="local", base_url=server, candidates=2, rounds=2, reward=Redness())
    out = call("a cat", [method])
    trace = out.traces["prompt_rewrite"][0]
    best_prompt, best_score = max(trace["candidates"], key=lambda x: x[1])
    assert trace["chosen"] == best_prompt and len({s for _, s in trace["candidates"]}) > 1
    assert np.abs(out.images - call(best_prompt).images).max() < 1e-6
    folder = save_tiny_gpt2(str(tmp_path / "gpt2"))
    rewritten = call("a red cat", [Promptist(model=folder, tokenizer=folder, max_new_tokens=6)])
    ((_, new_prompt),) = rewritten.traces["promptist"]
    assert np.abs(rewritten.images - call(new_prompt).images).max() < 1e-6
