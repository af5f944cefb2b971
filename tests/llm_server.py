"""A small OpenAI-compatible chat server for the tests:
`python tests/llm_server.py [--key KEY] [--mode ok|fail|slow|flaky|nologprobs] [--delay SECONDS]`.

It prints its port, then answers `POST /v1/chat/completions`:
- a text message: deterministic rewrites of the prompt in the last user message (`"<prompt>, variant k"`, one per
  line, as many as asked), or, when the system prompt asks for yes/no questions, `id | question | parents` lines;
- a message with an `image_url` part (a PNG data URL): a vision model's one-token answer whose log-probabilities
  make `P(yes) / (P(yes) + P(no))` the image's mean red channel (`Yes` and ` yes` share P(yes)); with
  `--mode nologprobs`, only the written answer.
`GET /stats` answers the request count and the most requests in flight at once. `--mode flaky` fails every other
request with a 500.
"""

import argparse
import base64
import io
import json
import math
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REQUESTS = {"chat": 0, "in_flight": 0, "max_in_flight": 0}
LOCK = threading.Lock()


def questions(prompt: str) -> str:
    """`id | question | parents` lines: one entity question per word after "a"/"two", an attribute question for
    "red", and a malformed line the reader must skip."""
    lines = ["Here are the questions:"]
    words = prompt.lower().split()
    for k, word in enumerate(words):
        if word in ("circle", "square", "circles", "squares"):
            lines.append(f"{len(lines)} | Is there a {word.rstrip('s')}? | 0")
            if k and words[k - 1] == "red":
                lines.append(f"{len(lines)} | Is the {word} red? | {len(lines) - 1}")
    return "\n".join(lines)


def redness(url: str) -> float:
    from PIL import Image

    data = base64.b64decode(url.split(",", 1)[1])
    pixels = list(Image.open(io.BytesIO(data)).convert("RGB").getdata())
    return sum(p[0] for p in pixels) / (255.0 * len(pixels))


def vision_reply(content: list) -> tuple[str, dict | None]:
    url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
    p = min(max(redness(url), 1e-4), 1 - 1e-4)
    top = [
        {"token": "Yes", "logprob": math.log(0.9 * p), "bytes": None},
        {"token": " yes", "logprob": math.log(0.1 * p), "bytes": None},
        {"token": "No", "logprob": math.log(1 - p), "bytes": None},
    ]
    top.sort(key=lambda t: -t["logprob"])
    first = top[0]
    position = {"token": first["token"], "logprob": first["logprob"], "bytes": None, "top_logprobs": top}
    logprobs = {"content": [position]}
    return first["token"].strip(), (None if ARGS.mode == "nologprobs" else logprobs)


def rewrites(message: str) -> list[str]:
    n = re.search(r"in (\d+) different ways|Write (\d+) new prompt", message)
    count = int(next(g for g in n.groups() if g)) if n else 1
    prompt = message.split("\n")[1].strip()
    return [f"{prompt}, variant {k} with a red sky" if k % 2 else f"{prompt}, variant {k}" for k in range(count)]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"requests": REQUESTS["chat"], "max_in_flight": REQUESTS["max_in_flight"]})

    def do_POST(self):
        with LOCK:
            REQUESTS["chat"] += 1
            REQUESTS["in_flight"] += 1
            REQUESTS["max_in_flight"] = max(REQUESTS["max_in_flight"], REQUESTS["in_flight"])
            count = REQUESTS["chat"]
        try:
            self._answer(count)
        finally:
            with LOCK:
                REQUESTS["in_flight"] -= 1

    def _answer(self, count: int):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if ARGS.key and self.headers.get("Authorization") != f"Bearer {ARGS.key}":
            return self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        if ARGS.mode == "fail" or (ARGS.mode == "flaky" and count % 2 == 1):
            return self._send(500, {"error": {"message": "model crashed", "type": "server_error"}})
        if ARGS.mode == "slow":
            time.sleep(3)
        time.sleep(ARGS.delay)
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        system = " ".join(m["content"] for m in body["messages"] if m["role"] == "system")
        logprobs = None
        if isinstance(user, list):
            content, logprobs = vision_reply(user)
        elif "yes/no questions" in system:
            content = questions(user)
        else:
            content = "\n".join(f"{k + 1}. {text}" for k, text in enumerate(rewrites(user)))
        self._send(
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", default=None)
    parser.add_argument("--mode", default="ok", choices=["ok", "fail", "slow", "flaky", "nologprobs"])
    parser.add_argument("--delay", type=float, default=0.0)
    ARGS = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()
