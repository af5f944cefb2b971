"""The server's request policy and its defences, each through a real server process on loopback (no mocks): what a
request may set, what it may cost, what happens when its client leaves, and what bad input, bad neighbours and bad
calls get."""

import asyncio
import json
import os
import socket
import time

import httpx
import pytest
from test_serve import KEY, Server, _metric

AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    srv = Server(
        "--allow",
        "best_of_n",
        "--allow",
        "seed_search",
        "--allow",
        "attend_and_excite",
        "--allow",
        "prompt_rewrite:model=local-llm,base_url=http://127.0.0.1:9/v1",
        "--allow",
        "fail_on",
        "--allow",
        "oom_above",
        "--reward",
        "shapes_soft",
        "--max-steps",
        "100",
        "--batch-window",
        "0.3",
        "--max-batch-images",
        "16",
        "--header-timeout",
        "2",
    )
    yield srv
    srv.close()


def _post(server, body, headers=AUTH, **kwargs):
    return httpx.post(server.url + "/images/generations", json=body, headers=headers, timeout=120, **kwargs)


def _error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "\n" not in error["message"] and len(error["message"]) <= 1000
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize(
    "option",
    [
        "base_url=http://attacker.example/v1",
        "api_key_env=AWS_SECRET_ACCESS_KEY",
        "timeout=100000",
        "max_retries=1000",
        "model=gpt-4o",
        "system_prompt=x",
    ],
)
def test_a_request_cannot_set_the_servers_options(server, option):
    key = option.split("=")[0]
    r = _post(server, {"prompt": "a cat", "ttalign": {"alignment": [f"prompt_rewrite:{option}"]}})
    error = _error(r, 400, "option_not_allowed")
    assert f"'{key}'" in error["message"] and "set by the server" in error["message"]
    assert error["param"] == "ttalign.alignment[0]"
    assert "attacker" not in error["message"]  # the option is named, its value not echoed as something it is not
    name, value = option.split("=")
    r = _post(server, {"prompt": "a cat", "ttalign": {"alignment": [{"name": "prompt_rewrite", name: value}]}})
    _error(r, 400, "option_not_allowed")


def test_the_methods_listing_shows_what_requests_may_set_and_no_server_values(server):
    listed = httpx.get(server.url + "/ttalign/methods", headers=AUTH).json()
    assert listed["rewards"] == ["shapes_soft"] and listed["max_side"] == 48
    assert set(listed["options"]["prompt_rewrite"]) == {"candidates", "reward", "rounds", "temperature"}
    assert listed["options"]["best_of_n"]["n"] == "integer 1-16"
    assert "127.0.0.1:9" not in json.dumps(listed)  # the server's base_url stays the server's


def test_rewards_are_named_from_those_loaded_at_start_up(server):
    start = time.time()
    r = _post(server, {"prompt": "a cat", "ttalign": {"alignment": ["best_of_n:n=2,reward=image_reward"]}})
    error = _error(r, 400, "invalid_method")
    assert "must name a reward this server loaded: shapes_soft" in error["message"]
    assert time.time() - start < 5  # refused, not loaded
    r = _post(server, {"prompt": "a cat", "ttalign": {"alignment": ["best_of_n:n=2,reward=@os:system"]}})
    _error(r, 400, "invalid_method")


def test_compute_is_priced_and_bounded(server):
    """10 images x best-of-10 x 100 steps is 10,000 image-steps, over the 2,000 default budget: refused before it is
    queued, with the price in the message; one image of it (1,000) runs."""
    body = {
        "prompt": "a red circle",
        "n": 10,
        "ttalign": {"steps": 100, "alignment": ["best_of_n:n=10,reward=shapes_soft"]},
    }
    error = _error(_post(server, body), 400, "over_budget")
    assert "costs 10000 image-steps" in error["message"] and "2000" in error["message"]
    assert "driven by BestOfN.n=10" in error["message"]  # the method's declared costly options, with their values
    error = _error(
        _post(
            server,
            {
                **body,
                "n": 1,
                "ttalign": {"steps": 100, "alignment": ["seed_search:n=16,rounds=16,neighbors=16,reward=shapes_soft"]},
            },
        ),
        400,
        "over_budget",
    )
    assert "driven by SeedSearch.n=16, SeedSearch.rounds=16, SeedSearch.neighbors=16" in error["message"]
    # sizes up to 1.5 x the native 32 pixels
    _error(_post(server, {"prompt": "a cat", "size": "64x64"}), 400)
    ok = _post(server, {"prompt": "a cat", "size": "48x48", "ttalign": {"steps": 2}})
    assert ok.status_code == 200, ok.text
    for spec, message in [
        ("attend_and_excite:kernel_size=99", "between 1 and 15"),
        ("attend_and_excite:kernel_size=4", "must be odd"),
        ("best_of_n:n=17,reward=shapes_soft", "between 1 and 16"),
        ("best_of_n:n=1e9,reward=shapes_soft", "expected an integer"),
    ]:
        error = _error(_post(server, {"prompt": "a cat", "ttalign": {"alignment": [spec]}}), 400)
        assert message in error["message"], error


def test_non_json_bodies_are_refused_with_415(server):
    """A page on another site can post a form (text/plain, urlencoded, multipart) without a preflight: refused."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = dict(AUTH) if content_type is None else {**AUTH, "Content-Type": content_type}
        r = httpx.post(server.url + "/images/generations", content=b'{"prompt": "a cat"}', headers=headers)
        _error(r, 415, "unsupported_media_type")


def test_hosts_and_origins(server):
    r = httpx.get(server.url + "/models", headers={**AUTH, "Host": "attacker.example"})
    _error(r, 400, "invalid_host")  # DNS rebinding: a page at attacker.example resolved to 127.0.0.1
    r = httpx.get(server.url + "/models", headers={**AUTH, "Host": f"localhost:{server.port}"})
    assert r.status_code == 200
    r = _post(server, {"prompt": "a cat"}, headers={**JSON, "Origin": "https://evil.example"})
    _error(r, 403, "forbidden_origin")
    r = httpx.options(
        server.url + "/images/generations",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    same = _post(
        server, {"prompt": "a cat", "ttalign": {"steps": 2}}, headers={**JSON, "Origin": server.base}
    )  # the playground page itself
    assert same.status_code == 200, same.text


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to overflow a recursive parser
        b'{"prompt": "a cat", "n": 1' + b"0" * 5000 + b"}",  # an integer of 5001 digits
        b'{"prompt": "a cat", "n": NaN}',
        b'{"prompt": "a cat"',
        b'\xff\xfe{"prompt": "a cat"}',
        b'{"prompt": "\\ud800 a cat"}',  # a lone surrogate
        b'{"prompt": "a cat", "\\udc00": 1}',  # a lone surrogate in a key
        '{"prompt": "a cat", "size": "3\u00b2x32"}'.encode(),  # a superscript digit
        b'{"prompt": "a cat", "size": "' + b"9" * 5000 + b'x32"}',
        b'{"prompt": "a cat", "output_format": ["png"]}',
        b'{"prompt": "a cat", "output_format": {"png": 1}}',
        b'{"prompt": "a cat", "ttalign": {"alignment": [{"name": "best_of_n", "n": {"a": '
        + b"[" * 20
        + b"]" * 20
        + b"}}]}}",  # nesting past the depth limit
    ],
)
def test_malformed_bodies_get_400(server, content):
    r = httpx.post(server.url + "/images/generations", content=content, headers=JSON, timeout=60)
    _error(r, 400)


def test_bodies_over_the_limit_are_not_read(server):
    """64 MiB announced by Content-Length is refused from the header; a chunked body is cut at the 1 MiB limit."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 67108864\r\n\r\n"
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        s.setblocking(False)
        answer = b""
        deadline = time.time() + 30
        while sent < 64 << 20 and time.time() < deadline:
            try:
                answer += s.recv(4096)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
        s.setblocking(True)
        answer = answer or s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and sent < 16 << 20, (answer[:100], sent)


def test_a_long_spec_gets_a_short_error(server):
    spec = "best_of_n:" + "n=2," * 50_000
    error = _error(_post(server, {"prompt": "a cat", "ttalign": {"alignment": [spec]}}), 400)
    assert "at most 1000 characters" in error["message"]
    error = _error(_post(server, {"prompt": "a cat", "ttalign": {"alignment": ["x" * 900 + "\u202e" * 50]}}), 400)
    assert len(error["message"]) < 400


def test_connections_that_never_finish_their_headers_are_closed(server):
    """150 clients that send half a request line and wait (slowloris) are closed after the header timeout (2 s here),
    and the server answers others meanwhile."""
    socks = []
    for _ in range(150):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    try:
        assert httpx.get(server.base + "/health", timeout=10).status_code == 200
        time.sleep(4)
        closed = 0
        for s in socks:
            try:
                s.settimeout(5)
                closed += s.recv(4096) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed == 150
    finally:
        for s in socks:
            s.close()
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200


def test_one_failing_member_of_a_merged_call_fails_alone(server):
    """Four requests merged into one call, one failing: the call is split in halves until the failing one is alone;
    the three others are answered, and the failure is counted."""
    before = server.metrics()

    async def four():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            bodies = [
                {"prompt": f"a {word} circle", "ttalign": {"seed": k, "steps": 4, "alignment": ["fail_on"]}}
                for k, word in enumerate(["red", "green", "boom", "blue"])
            ]
            return await asyncio.gather(*(http.post(server.url + "/images/generations", json=b) for b in bodies))

    responses = asyncio.run(four())
    assert [r.status_code for r in responses] == [200, 200, 500, 200], [r.text for r in responses]
    assert responses[2].json()["error"]["message"].startswith("RuntimeError: the prompt contains 'boom'")
    after = server.metrics()
    assert _metric(after, 'ttalign_pipeline_calls_total{outcome="failed"}') > _metric(
        before, 'ttalign_pipeline_calls_total{outcome="failed"}'
    )
    assert (
        _metric(after, 'ttalign_failed_requests_total{reason="method_failed"}')
        - _metric(before, 'ttalign_failed_requests_total{reason="method_failed"}')
        == 1
    )


def test_spellings_of_one_setting_share_one_method_and_one_call(server):
    """32 requests spelling one best-of-2 setting differently (trailing commas, spaces, order, defaults written out,
    objects) make one method object, so they merge into shared calls."""
    spellings = [
        "best_of_n:n=2,reward=shapes_soft",
        "best_of_n:n=2,reward=shapes_soft,",
        " best_of_n : reward=shapes_soft , n=2 ",
        "best_of_n:reward=shapes_soft,n=2,,",
        "best_of_n:n=+2 , reward = shapes_soft",
        {"name": "best_of_n", "n": 2, "reward": "shapes_soft"},
        {"reward": "shapes_soft", "name": "best_of_n", "n": "2"},
        "best_of_n:n=02,reward=shapes_soft",
    ]
    before = server.metrics()

    async def many():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            bodies = [
                {"prompt": "a red circle", "ttalign": {"seed": k, "steps": 3, "alignment": [spellings[k % 8]]}}
                for k in range(32)
            ]
            return await asyncio.gather(*(http.post(server.url + "/images/generations", json=b) for b in bodies))

    responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    after = server.metrics()
    assert _metric(after, "ttalign_cached_methods") - _metric(before, "ttalign_cached_methods") == 1
    calls = _metric(after, "ttalign_batch_requests_count") - _metric(before, "ttalign_batch_requests_count")
    assert calls <= 8  # merged: at most 8 requests' latents (2 candidates each) in 16 per call, and fewer calls


def test_a_call_out_of_memory_is_split_and_its_tensors_freed(server):
    """Three requests merged into a call of three images run out of memory; the worker frees the failed call's
    tensors (the test method checks) and splits it until each part fits: all three are answered."""
    before = server.metrics()

    async def three():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            body = {"prompt": "a red circle", "ttalign": {"steps": 2, "alignment": ["oom_above:images=1"]}}
            return await asyncio.gather(*(http.post(server.url + "/images/generations", json=body) for _ in range(3)))

    responses = asyncio.run(three())
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    after = server.metrics()
    oom = 'ttalign_pipeline_calls_total{outcome="out_of_memory"}'
    assert _metric(after, oom) > _metric(before, oom)
    # one request whose images do not fit even alone is retried once, then answered 503
    body = {"prompt": "a red circle", "n": 2, "ttalign": {"steps": 2, "alignment": ["oom_above:images=1"]}}
    _error(_post(server, body), 503, "out_of_memory")
    r = _post(server, {"prompt": "a cat", "ttalign": {"steps": 2}})
    assert r.status_code == 200


def test_an_abandoned_call_stops_within_a_step(server):
    """A best-of-16 at 100 steps (about 1,600 image-steps) whose client leaves after a second is stopped at the next
    denoiser step: the next request is answered at once, and the cancellation is counted."""
    before = server.metrics()
    body = {"prompt": "a red circle", "ttalign": {"steps": 100, "alignment": ["best_of_n:n=16,reward=shapes_soft"]}}
    start = time.time()
    full = _post(server, body)
    full_s = time.time() - start
    assert full.status_code == 200

    async def scenario():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            abandoned = asyncio.ensure_future(http.post(server.url + "/images/generations", json=body))
            await asyncio.sleep(min(1.0, full_s / 4))
            abandoned.cancel()
            await asyncio.sleep(0.5)  # the server sees the disconnect within its 0.25 s poll
            start = time.time()
            small = {"prompt": "a dog", "ttalign": {"steps": 2}}
            quick = await http.post(server.url + "/images/generations", json=small)
            return quick, time.time() - start

    quick, quick_s = asyncio.run(scenario())
    assert quick.status_code == 200 and quick_s < full_s / 2, (quick_s, full_s)
    after = server.metrics()
    reason = 'ttalign_cancelled_requests_total{reason="disconnected"}'
    assert _metric(after, reason) - _metric(before, reason) == 1
    cancelled = 'ttalign_pipeline_calls_total{outcome="cancelled"}'
    assert _metric(after, cancelled) - _metric(before, cancelled) == 1


def test_bearer_scheme_and_key_rules(server, capsys):
    for header in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY}", f"BEARER {KEY}"):
        assert httpx.get(server.url + "/models", headers={"Authorization": header}).status_code == 200, header
    for header in (f"Basic {KEY}", f"Bearer {KEY}x", "Bearer", f"Bearer {KEY} extra", KEY):
        assert httpx.get(server.url + "/models", headers={"Authorization": header}).status_code == 401, header
    from ttalign.cli import main

    for blank in ("", "   ", "\t"):
        os.environ["TTALIGN_BLANK_KEY_FOR_TEST"] = blank
        try:
            assert main(["serve", "--api-key-env", "TTALIGN_BLANK_KEY_FOR_TEST"]) == 2
        finally:
            del os.environ["TTALIGN_BLANK_KEY_FOR_TEST"]
        assert "blank" in capsys.readouterr().err


def test_health_says_when_the_worker_is_dead():
    srv = Server("--allow", "die", key=None)
    try:
        r = _post(srv, {"prompt": "a cat", "ttalign": {"steps": 2, "alignment": ["die"]}}, headers={})
        _error(r, 503, "worker_dead")
        health = httpx.get(srv.base + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "dead"
        _error(_post(srv, {"prompt": "a cat", "ttalign": {"steps": 2}}, headers={}), 503, "worker_dead")
    finally:
        srv.close()


def test_health_says_when_a_call_is_stuck():
    srv = Server("--allow", "hang", "--stuck-after", "1", key=None)
    try:

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as http:
                body = {"prompt": "a cat", "ttalign": {"steps": 2, "alignment": ["hang:seconds=4"]}}
                call = asyncio.ensure_future(http.post(srv.url + "/images/generations", json=body))
                await asyncio.sleep(2.5)
                health = await http.get(srv.base + "/health")
                return health, await call

        health, answer = asyncio.run(scenario())
        assert health.status_code == 503 and health.json()["status"] == "stuck"
        assert answer.status_code == 200
        assert httpx.get(srv.base + "/health", timeout=10).status_code == 200  # it came back
    finally:
        srv.close()


def test_any_json_value_in_any_field_gets_an_answer_not_a_crash(server):
    """Property test: every field of the body (and of an alignment object) holds any JSON value; the answer is a 200
    or a 4xx error body, never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.one_of(
            st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20)
        ),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=8,
    )
    method_names = st.sampled_from(["best_of_n", "seed_search", "attend_and_excite", "prompt_rewrite", "nope"])
    method_objects = st.fixed_dictionaries(
        {"name": st.one_of(method_names, json_values)},
        optional={k: json_values for k in ("n", "reward", "tokens", "kernel_size", "thresholds", "base_url")},
    )
    ttalign_fields = ("seed", "steps", "guidance_scale", "negative_prompt", "eta", "alignment")
    bodies = st.fixed_dictionaries(
        {"prompt": st.one_of(st.just("a red circle"), json_values)},
        optional={
            **{k: json_values for k in ("n", "size", "response_format", "stream", "model", "output_format")},
            "ttalign": st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {},
                    optional={
                        **{k: json_values for k in ttalign_fields},
                        "alignment": st.lists(st.one_of(method_objects, json_values), max_size=2),
                    },
                ),
            ),
        },
    )

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body):
        if isinstance(body.get("ttalign"), dict):
            body["ttalign"]["steps"] = 2  # keep the valid ones cheap
        body["n"] = 1 if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) else body.get("n", 1)
        r = httpx.post(
            server.url + "/images/generations", content=json.dumps(body).encode(), headers=JSON, timeout=120
        )
        assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code != 200 and "text/event-stream" not in r.headers.get("content-type", ""):
            assert r.json()["error"]["message"]

    check()
