"""The OpenAI-compatible server: a real uvicorn process on loopback, the official `openai` client, no mocks."""

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

KEY = "test-key-123"
APP = os.path.join(os.path.dirname(__file__), "serve_app.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process; `url` is its `/v1` base."""

    def __init__(self, *args, key: str | None = KEY):
        self.port = _free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("TTALIGN_API_KEY", None)
        if key is not None:
            env["TTALIGN_API_KEY"] = key
        cmd = [sys.executable, APP, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def client(self, key=KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, **kwargs)

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def server():
    srv = Server(
        "--allow",
        "best_of_n",
        "--allow",
        "attend_and_excite",
        "--allow",
        "fail_on",
        "--reward",
        "shapes_soft",
        "--max-steps",
        "30",
        "--max-candidates",
        "8",
        "--batch-window",
        "0.2",
        "--max-batch-images",
        "16",
    )
    yield srv
    srv.close()


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generate_decode_and_match_the_local_pipeline(server):
    from ttalign.shapes import load_pipeline

    client = server.client()
    response = client.images.generate(
        prompt="a red circle left of a blue square",
        n=2,
        size="32x32",
        extra_body={"ttalign": {"seed": 5, "steps": 10}},
    )
    assert len(response.data) == 2 and response.size == "32x32"
    images = [np.asarray(_decode(d.b64_json).convert("RGB")) for d in response.data]
    seeds = [d.model_extra["seed"] for d in response.data]
    assert seeds == [5, 6] and response.data[0].model_extra["compute"]["nfe_per_image"] == 10
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    local = pipe(
        ["a red circle left of a blue square"] * 2,
        num_inference_steps=10,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    assert np.abs(np.stack(images).astype(int) - (local * 255).round().astype(int)).max() <= 1


def test_alignment_through_extra_body(server):
    client = server.client()
    out = client.images.generate(
        prompt="two red circles",
        extra_body={"ttalign": {"seed": 1, "steps": 8, "alignment": ["best_of_n:n=3,reward=shapes_soft"]}},
    )
    item = out.data[0].model_extra
    assert 0 < item["reward"] <= 1 and item["compute"]["nfe_per_image"] == 8 * 3
    plain = client.images.generate(prompt="two red circles", extra_body={"ttalign": {"seed": 1, "steps": 8}})
    assert "reward" not in plain.data[0].model_extra and plain.data[0].model_extra["compute"]["nfe_per_image"] == 8


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "a cat", "n": 0}, 400, "n"),
        ({"prompt": "a cat", "n": 11}, 400, "n"),
        ({"prompt": "a cat", "size": "33x32"}, 400, "size"),
        ({"prompt": "a cat", "size": "big"}, 400, "size"),
        ({"prompt": "a cat", "response_format": "url"}, 400, "response_format"),
        ({"prompt": "x" * 2001}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "a cat", "colour": "red"}, 400, "colour"),
        ({"prompt": "a cat", "model": "dall-e-3"}, 404, "model"),
        (
            {"prompt": "a cat", "ttalign": {"alignment": ["seed_search:reward=shapes_soft"]}},
            400,
            "ttalign.alignment[0]",
        ),
        ({"prompt": "a cat", "ttalign": {"alignment": ["nope"]}}, 400, "ttalign.alignment[0]"),
        (
            {"prompt": "a cat", "ttalign": {"alignment": ["best_of_n:n=9,reward=shapes_soft"]}},
            400,
            "ttalign.alignment[0]",
        ),
        (
            {"prompt": "a cat", "ttalign": {"alignment": ["attend_and_excite:tokens=@os:system"]}},
            400,
            "prompt",
        ),  # a word, not an import: refused as it is not in the prompt
        ({"prompt": "a cat", "ttalign": {"steps": 31}}, 400, "ttalign.steps"),
        ({"prompt": "a cat", "ttalign": {"steps": -3}}, 400, "ttalign.steps"),
        ({"prompt": "a cat", "ttalign": {"tokens": 3}}, 400, "ttalign.tokens"),
    ],
)
def test_bad_requests_get_error_bodies(server, body, status, param):
    r = httpx.post(server.url + "/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text


def test_errors_map_to_the_clients_exceptions_and_the_server_keeps_serving(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="between 1 and 10"):
        client.images.generate(prompt="a cat", n=11)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        server.client(key="wrong").images.generate(prompt="a cat")
    r = httpx.post(server.url + "/images/generations", json={"prompt": "a cat"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(
        server.url + "/images/generations",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(server.url + "/nowhere", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/models").status_code == 401  # the key guards every /v1 route
    assert client.models.list().data[0].id == "shapes"
    assert client.images.generate(prompt="a cat", extra_body={"ttalign": {"steps": 2}}).data[0].b64_json


def test_a_failing_method_fails_only_its_own_request(server):
    """Two requests merged into one call, one of them failing: the other is answered (each reruns alone), the
    failing one gets a 500 that tells the client not to retry, and the pipeline serves the next request unchanged."""
    client = server.client(max_retries=0)
    before = client.images.generate(prompt="a red square", extra_body={"ttalign": {"seed": 2, "steps": 4}})

    async def both():
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
            ok = {"prompt": "a green circle", "ttalign": {"steps": 4, "alignment": ["fail_on:word=boom"]}}
            bad = {"prompt": "a boom circle", "ttalign": {"steps": 4, "alignment": ["fail_on:word=boom"]}}
            return await asyncio.gather(*(http.post(server.url + "/images/generations", json=b) for b in (ok, bad)))

    good, failed = asyncio.run(both())
    assert good.status_code == 200 and good.json()["data"][0]["compute"]["batch_requests"] == 1  # reran alone
    assert failed.status_code == 500 and failed.headers["x-should-retry"] == "false"
    assert failed.json()["error"]["message"].startswith("RuntimeError: the prompt contains 'boom'")
    after = client.images.generate(prompt="a red square", extra_body={"ttalign": {"seed": 2, "steps": 4}})
    assert after.data[0].b64_json == before.data[0].b64_json


def test_concurrent_requests_are_merged_and_all_answered(server):
    async def many():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            bodies = [
                {"prompt": f"a red circle and {k % 3 + 1} squares", "ttalign": {"seed": k, "steps": 4}}
                for k in range(50)
            ]
            return await asyncio.gather(*(http.post(server.url + "/images/generations", json=b) for b in bodies))

    before = server.metrics()
    responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * 50
    assert [r.json()["data"][0]["seed"] for r in responses] == list(range(50))
    merged = [r.json()["data"][0]["compute"]["batch_requests"] for r in responses]
    assert max(merged) > 1
    after = server.metrics()
    calls = _metric(after, "ttalign_batch_requests_count") - _metric(before, "ttalign_batch_requests_count")
    assert calls < 50  # fewer pipeline calls than requests
    assert _metric(after, "ttalign_images_total") - _metric(before, "ttalign_images_total") == 50


def test_streaming_events_parsed_by_the_client(server):
    events = list(
        server.client().images.generate(
            prompt="a blue square", stream=True, partial_images=2, extra_body={"ttalign": {"seed": 4, "steps": 6}}
        )
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = _decode(events[-1].b64_json)
    assert final.size == (32, 32) and events[-1].model_extra["seed"] == 4
    plain = server.client().images.generate(prompt="a blue square", extra_body={"ttalign": {"seed": 4, "steps": 6}})
    assert plain.data[0].b64_json == events[-1].b64_json  # previews do not change the image


def test_health_models_and_metrics(server):
    health = httpx.get(server.base + "/health").json()
    assert health["status"] == "ok" and health["model"] == "shapes"
    text = server.metrics()
    for name in (
        "ttalign_queue_depth",
        "ttalign_request_latency_seconds_bucket",
        "ttalign_images_total",
        "ttalign_nfe_total",
        "ttalign_rejected_requests_total",
        "process_resident_memory_bytes",
    ):
        assert name in text, name
    assert httpx.get(server.base + "/metrics").status_code == 401


def test_overload_answers_429_with_retry_after_and_every_accepted_request():
    srv = Server("--queue-size", "3", "--max-batch-images", "1", key=None)
    try:

        async def flood():
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"prompt": "a red circle", "ttalign": {"steps": 6}}
                return await asyncio.gather(
                    *(http.post(srv.url + "/images/generations", json=body) for _ in range(20))
                )

        responses = asyncio.run(flood())
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429} and codes.count(429) >= 10
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "2" and r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["data"][0]["b64_json"]
        assert _metric(srv_metrics(srv), 'ttalign_rejected_requests_total{reason="queue_full"}') == codes.count(429)
        # the client retries 429 after Retry-After, so a retrying client gets through
        assert srv.client(key="unused", max_retries=5).images.generate(prompt="a cat").data[0].b64_json
    finally:
        srv.close()


def srv_metrics(srv) -> str:
    return httpx.get(srv.base + "/metrics", timeout=10).text


def test_a_client_that_leaves_while_queued_is_dropped():
    srv = Server("--max-batch-images", "1", key=None)
    try:

        async def scenario():
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"prompt": "a cat", "n": 10, "ttalign": {"steps": 80}}
                slow = asyncio.ensure_future(http.post(srv.url + "/images/generations", json=body))
                await asyncio.sleep(1.0)  # the slow request (about 10 s) is running
                impatient_client = httpx.AsyncClient(timeout=120)
                impatient = asyncio.ensure_future(
                    impatient_client.post(srv.url + "/images/generations", json={"prompt": "a dog"})
                )
                while (await http.get(srv.base + "/health")).json()["queue_depth"] < 1:
                    assert not slow.done(), "the slow request ended before the second one was queued"
                    await asyncio.sleep(0.05)
                impatient.cancel()  # the client leaves while its request waits in the queue
                await impatient_client.aclose()
                return await slow

        assert asyncio.run(scenario()).status_code == 200
        deadline = time.time() + 10
        while _metric(srv_metrics(srv), 'ttalign_cancelled_requests_total{reason="disconnected"}') < 1:
            assert time.time() < deadline
            time.sleep(0.2)
        assert _metric(srv_metrics(srv), "ttalign_images_total") == 10  # the dropped request drew nothing
    finally:
        srv.close()


def test_refuses_to_listen_beyond_loopback_without_a_key(capsys):
    from ttalign.cli import main
    from ttalign.serve import check_bind, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    with pytest.raises(ValueError, match="Refusing to listen on '0.0.0.0' without an API key"):
        check_bind("0.0.0.0", None, "TTALIGN_API_KEY")
    check_bind("0.0.0.0", "k", "TTALIGN_API_KEY")
    os.environ.pop("TTALIGN_API_KEY_FOR_TEST", None)
    assert main(["serve", "--host", "0.0.0.0", "--api-key-env", "TTALIGN_API_KEY_FOR_TEST"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_generate_refuses_bad_settings(tmp_path, capsys):
    from ttalign.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--model", "tiny", "--steps", "-3", "--out", str(out)]) == 2
    assert "--steps must be between 1 and 1000, got -3" in capsys.readouterr().err and not out.exists()
    assert main(["generate", "a cat", "--model", "tiny", "--height", "30", "--out", str(out)]) == 2
    assert main(["generate", "--model", "tiny", "--out", str(out)]) == 2


def test_the_playground_page_is_served(server):
    page = httpx.get(server.base + "/")
    assert page.status_code == 200 and "ttalign playground" in page.text and "/v1/images/generations" in page.text
    listed = httpx.get(server.url + "/ttalign/methods", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert listed["allow"] == ["attend_and_excite", "best_of_n", "fail_on"]


def test_request_bodies_never_crash_the_server(server):
    """Property test: any JSON body gets a 200 or a 4xx with the error body, never a 5xx or a traceback, and the
    server answers the next valid request."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=30)
    )
    specs = st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda name, opts: name + (":" + opts if opts else ""),
            st.sampled_from(["best_of_n", "attend_and_excite", "nope", "seed_search"]),
            st.text(alphabet="n=,:@rewardshapes_soft0123456789x.+-", max_size=30),
        ),
    )
    ttalign_options = st.dictionaries(
        st.sampled_from(["seed", "steps", "guidance_scale", "negative_prompt", "eta", "alignment", "other"]),
        st.one_of(scalars, st.lists(specs, max_size=3)),
        max_size=4,
    )
    bodies = st.one_of(
        scalars,
        st.lists(scalars, max_size=3),
        st.fixed_dictionaries(
            {"prompt": st.one_of(st.text(max_size=60), scalars)},
            optional={
                "n": scalars,
                "size": st.one_of(scalars, st.sampled_from(["32x32", "8x8", "2000x8", "0x0"])),
                "response_format": st.one_of(scalars, st.sampled_from(["url", "b64_json"])),
                "stream": scalars,
                "model": scalars,
                "ttalign": st.one_of(scalars, ttalign_options),
                "output_format": st.sampled_from(["png", "jpeg", "gif"]),
                "quality": scalars,
            },
        ),
    )
    headers = {"Authorization": f"Bearer {KEY}"}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body):
        if isinstance(body, dict) and isinstance(body.get("ttalign"), dict):
            body["ttalign"].setdefault("steps", 2)  # keep the valid ones cheap
            if isinstance(body.get("n"), int):
                body["n"] = min(body["n"], 2)
        content = json.dumps(body, allow_nan=True).encode()
        r = httpx.post(server.url + "/images/generations", content=content, headers=headers, timeout=120)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code != 200 and "text/event-stream" not in r.headers.get("content-type", ""):
            error = r.json()["error"]
            assert error["message"] and "\n" not in error["message"] and "Traceback" not in r.text

    check()
    valid = server.client().images.generate(prompt="a cat", extra_body={"ttalign": {"steps": 2}})
    assert valid.data[0].b64_json


def test_a_request_not_answered_in_time_gets_504_and_the_server_goes_on():
    srv = Server("--request-timeout", "1", key=None)
    try:
        r = httpx.post(
            srv.url + "/images/generations", json={"prompt": "a cat", "n": 10, "ttalign": {"steps": 100}}, timeout=60
        )
        assert r.status_code == 504 and r.headers["x-should-retry"] == "false"
        assert r.json()["error"]["type"] == "timeout" and "within 1 s" in r.json()["error"]["message"]
        # the abandoned call stops within a step, so the next request does not wait behind it
        start = time.time()
        quick = httpx.post(
            srv.url + "/images/generations", json={"prompt": "a dog", "ttalign": {"steps": 2}}, timeout=60
        )
        assert quick.status_code == 200 and time.time() - start < 5
        text = srv_metrics(srv)
        assert _metric(text, 'ttalign_cancelled_requests_total{reason="timeout"}') == 1
        assert _metric(text, 'ttalign_pipeline_calls_total{outcome="cancelled"}') == 1
    finally:
        srv.close()


def test_serves_an_sdxl_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from ttalign.testing import get_tiny_sdxl_components

    folder = tmp_path / "tiny-sdxl"
    StableDiffusionXLPipeline(**get_tiny_sdxl_components(), add_watermarker=False).save_pretrained(folder)
    srv = Server("--model", str(folder), "--allow", "best_of_n", "--reward", "jpeg_incompressibility", key=None)
    try:
        client = srv.client(key="unused")
        assert client.models.list().data[0].id == "tiny-sdxl"
        out = client.images.generate(
            prompt="a red circle",
            size="64x64",
            extra_body={
                "ttalign": {"seed": 1, "steps": 2, "alignment": ["best_of_n:n=2,reward=jpeg_incompressibility"]}
            },
        )
        assert _decode(out.data[0].b64_json).size == (64, 64) and out.data[0].model_extra["reward"] > 0
    finally:
        srv.close()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_serves_a_flow_folder_and_refuses_eta(tmp_path, family):
    """SD3 and FLUX folders serve like SD's; `eta` (a DDIM setting) is refused with a 400 naming it, as their
    pipelines take none."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from ttalign.testing import get_tiny_flux_components, get_tiny_sd3_components

    folder = tmp_path / f"tiny-{family}"
    if family == "sd3":
        StableDiffusion3Pipeline(**get_tiny_sd3_components()).save_pretrained(folder)
    else:
        FluxPipeline(**get_tiny_flux_components(guidance_embeds=True)).save_pretrained(folder)
    srv = Server("--model", str(folder), "--allow", "best_of_n", "--reward", "jpeg_incompressibility", key=None)
    try:
        client = srv.client(key="unused")
        out = client.images.generate(
            prompt="a red circle",
            size="32x32",
            n=2,
            extra_body={
                "ttalign": {"seed": 1, "steps": 2, "alignment": ["best_of_n:n=2,reward=jpeg_incompressibility"]}
            },
        )
        assert [_decode(d.b64_json).size for d in out.data] == [(32, 32)] * 2
        assert out.data[0].model_extra["reward"] > 0
        with pytest.raises(openai.BadRequestError, match="takes no eta") as error:
            client.images.generate(prompt="a red circle", size="32x32", extra_body={"ttalign": {"eta": 0.5}})
        assert error.value.body["param"] == "ttalign.eta"
    finally:
        srv.close()
