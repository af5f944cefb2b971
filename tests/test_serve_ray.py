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
