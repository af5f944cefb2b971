"""`ttalign serve --ray`: the same app as a Ray Serve deployment with two local CPU replicas."""

import asyncio
import os
import subprocess
import sys
import time

import httpx
import openai
from test_serve import _free_port


def test_two_ray_replicas_answer_the_same_client():
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TTALIGN_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "ttalign.cli",
        "serve",
        "--ray",
        "--replicas",
        "2",
        "--gpus-per-replica",
        "0",
        "--port",
        str(port),
        "--max-queued-requests",
        "4",
        "--allow",
        "best_of_n",
        "--reward",
        "shapes_soft",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None and time.time() < deadline, "the Ray Serve app did not start"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        import psutil

        # the HTTP proxy listens on the loopback only (Ray's own gRPC servers are Ray's: see docs/serving.md)
        listening = {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening == {"127.0.0.1"}, listening
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        options = {"seed": 3, "steps": 4, "alignment": ["best_of_n:n=2,reward=shapes_soft"]}
        out = client.images.generate(prompt="two red circles", extra_body={"ttalign": options})
        assert out.data[0].b64_json and out.data[0].model_extra["seed"] == 3 and "reward" in out.data[0].model_extra

        async def burst(count, steps):
            async with httpx.AsyncClient(timeout=240) as http:
                body = {"prompt": "a red circle", "ttalign": {"steps": steps}}
                return await asyncio.gather(
                    *(http.post(base + "/v1/images/generations", json=body) for _ in range(count))
                )

        replicas = set()
        for _ in range(5):  # the router may send one burst to one replica (it batches them); both serve over a few
            responses = asyncio.run(burst(4, 4))  # within 2 replicas x 1 in flight + 4 queued
            assert [r.status_code for r in responses] == [200] * 4
            replicas |= {r.headers["x-ttalign-replica"] for r in responses}
            if len(replicas) == 2:
                break
        assert len(replicas) == 2  # both replicas served
        flood = asyncio.run(burst(40, 15))
        codes = [r.status_code for r in flood]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 4
        assert all(r.headers["retry-after"] == "2" for r in flood if r.status_code == 429)
        assert all(r.json()["data"][0]["b64_json"] for r in flood if r.status_code == 200)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ray_args():
    """`ttalign serve --ray`'s arguments for `run_ray` over the tiny model, one CPU replica."""
    import argparse

    return argparse.Namespace(
        model="tiny", dtype="float32", device="cpu", replicas=1, gpus_per_replica=0.0, max_queued_requests=4,
        ray_node_ip="127.0.0.1", host="127.0.0.1", port=0,
    )  # fmt: skip


def test_local_ray_cluster_gives_the_proxy_time_to_start(monkeypatch):
    """Serve's proxy gets a minute per readiness check on a local cluster (Ray's 5 s fail on a busy machine); a value
    the user set stays, and a joined cluster (`RAY_ADDRESS`) keeps its operator's."""
    import ray

    from ttalign.serve.app import ServeConfig
    from ttalign.serve.ray_serve import run_ray

    seen = []

    class Stop(Exception):
        pass

    def fake_init(**kwargs):
        seen.append(os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"))
        raise Stop

    monkeypatch.setattr(ray, "init", fake_init)
    args = _ray_args()
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_ADDRESS"):
        monkeypatch.setenv(name, "")  # records the variable's state before the test, restored after it
    for preset, address, expected in (
        (None, None, "60.0"),
        ("12", None, "12"),
        (None, "127.0.0.1:6379", None),
    ):
        monkeypatch.delenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", raising=False)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        if preset:
            monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", preset)
        if address:
            monkeypatch.setenv("RAY_ADDRESS", address)
        try:
            run_ray(args, ServeConfig(model_name="tiny"))
        except Stop:
            pass
        assert seen[-1] == expected, (preset, address, seen)
    assert len(seen) == 3


def test_ray_serve_start_failure_shuts_the_cluster_down(monkeypatch):
    """An error while Serve starts stops Serve and the local cluster: nothing left running (SIGTERM, raised as
    KeyboardInterrupt by the handler installed before the start, leaves through the same `finally`)."""
    import signal

    import pytest
    import ray
    from ray import serve

    from ttalign.serve.app import ServeConfig
    from ttalign.serve.ray_serve import run_ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append("ray.init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))

    def failing_start(**kwargs):
        calls.append("serve.start")
        raise RuntimeError("replica failed to build")

    monkeypatch.setattr(serve, "start", failing_start)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave the test process's handlers alone
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = _ray_args()
    with pytest.raises(RuntimeError, match="replica failed to build"):
        run_ray(args, ServeConfig(model_name="tiny"))
    assert calls == ["ray.init", "serve.start", "serve.shutdown", "ray.shutdown"]
