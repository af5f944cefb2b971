"""Load test of `ttalign serve` on loopback: throughput and latency with and without request merging.

For each setting a fresh server process serves the embedded shapes model (`--queue-size 64`); `--clients` concurrent
clients (a bounded asyncio + httpx loop, loopback only) each send `--requests` generation requests of `--steps` steps,
retrying a 429 after its `Retry-After` (as the OpenAI client does). Reported: answered requests, 429s seen, 5xx
(must be 0), throughput (images/s), latency percentiles of the answered requests (from the first attempt, waits
included), pipeline calls and the largest merged batch (from `/metrics`), and the server's peak resident memory
(sampled from `/metrics` during the run). Writes `benchmarks/results/serving/serve_load.json` and `.md`.

    python benchmarks/serve_load.py --clients 200 --requests 1 --steps 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _largest_batch(text: str) -> int:
    """The largest `le` bucket of `ttalign_batch_requests` that a call fell into (an upper bound of the batch)."""
    counts = {}
    for line in text.splitlines():
        if line.startswith("ttalign_batch_requests_bucket"):
            le = line.split('le="')[1].split('"')[0]
            counts[float(le)] = float(line.split()[-1])
    previous, largest = 0.0, 0
    for le in sorted(counts):
        if counts[le] > previous and le != float("inf"):
            largest = int(le)
        previous = counts[le]
    return largest


async def _run_clients(base: str, args) -> dict:
    latencies, statuses, rejected = [], [], 0
    peak_rss = 0.0
    body = {"prompt": "a red circle left of a blue square", "ttalign": {"steps": args.steps}}

    async def client(http: httpx.AsyncClient, k: int):
        nonlocal rejected
        for r in range(args.requests):
            start = time.perf_counter()
            request = {**body, "ttalign": {**body["ttalign"], "seed": k * 100 + r}}
            for _ in range(args.max_attempts):
                response = await http.post(base + "/v1/images/generations", json=request)
                if response.status_code != 429:
                    break
                rejected += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            statuses.append(response.status_code)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)

    async def sample_memory(http: httpx.AsyncClient, done: asyncio.Event):
        nonlocal peak_rss
        while not done.is_set():
            text = (await http.get(base + "/metrics")).text
            peak_rss = max(peak_rss, _metric(text, "process_resident_memory_bytes"))
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        done = asyncio.Event()
        sampler = asyncio.ensure_future(sample_memory(http, done))
        start = time.perf_counter()
        await asyncio.gather(*(client(http, k) for k in range(args.clients)))
        seconds = time.perf_counter() - start
        done.set()
        await sampler
        metrics = (await http.get(base + "/metrics")).text
    ordered = sorted(latencies)

    def pct(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {
        "requests": len(statuses),
        "answered": statuses.count(200),
        "rejected_429_seen": rejected,
        "server_errors": sum(1 for s in statuses if s >= 500),
        "other_statuses": sorted({s for s in statuses if s not in (200,)}),
        "seconds": seconds,
        "images_per_s": statuses.count(200) / seconds,
        "latency_p50_s": pct(0.5),
        "latency_p95_s": pct(0.95),
        "latency_p99_s": pct(0.99),
        "latency_mean_s": statistics.mean(ordered) if ordered else float("nan"),
        "pipeline_calls": int(_metric(metrics, "ttalign_batch_requests_count")),
        "largest_batch_bucket": _largest_batch(metrics),
        "peak_rss_mb": peak_rss / 2**20,
    }


def run_setting(args, max_batch_images: int) -> dict:
    port = _free_port()
    env = {**os.environ}
    env.pop("TTALIGN_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "ttalign.cli",
        "serve",
        "--port",
        str(port),
        "--queue-size",
        str(args.queue_size),
        "--max-batch-images",
        str(max_batch_images),
        "--batch-window",
        str(args.batch_window),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        httpx.post(base + "/v1/images/generations", json={"prompt": "warm-up", "ttalign": {"steps": 2}}, timeout=60)
        return asyncio.run(_run_clients(base, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1, help="requests per client")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--batch-window", type=float, default=0.05)
    parser.add_argument("--max-batch-images", type=int, default=16)
    parser.add_argument("--max-attempts", type=int, default=50, help="attempts per request (429 retries)")
    args = parser.parse_args()
    rows = {}
    for name, batch in (("no merging", 1), ("merging", args.max_batch_images)):
        rows[name] = run_setting(args, batch)
        print(name, rows[name], flush=True)
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    env = environment()
    lines = [
        "# Serving under load",
        "",
        f"`{command}`",
        "",
        f"The embedded shapes model behind `ttalign serve` on loopback, queue of {args.queue_size}; {args.clients} "
        f"concurrent clients x {args.requests} request(s) of {args.steps} steps, each retrying a 429 after its "
        f"`Retry-After`; {env['device']}, the server and the clients on the same 2-core machine.",
        "",
        "| setting | answered | 429s seen (retried) | 5xx | images/s | p50 (s) | p95 (s) | p99 (s) | pipeline calls | "
        "largest merged batch | server peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['answered']}/{r['requests']} | {r['rejected_429_seen']} | {r['server_errors']} | "
            f"{r['images_per_s']:.2f} | {r['latency_p50_s']:.1f} | {r['latency_p95_s']:.1f} | "
            f"{r['latency_p99_s']:.1f} | {r['pipeline_calls']} | <= {r['largest_batch_bucket']} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    speedup = rows["merging"]["images_per_s"] / rows["no merging"]["images_per_s"]
    lines += [
        "",
        f"Merging gives {speedup:.2f}x the throughput. Latencies count from a request's first attempt, so "
        "they include the waits after 429s.",
        "",
    ]
    write_results(
        "serve_load",
        {"benchmark": "serve_load", "command": command, "rows": rows, "environment": env},
        "\n".join(lines),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
