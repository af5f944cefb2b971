"""A small OpenAI-compatible chat server for the tests: `python tests/llm_server.py [--key KEY] [--mode ok|fail|slow]`.

It prints its port, then answers `POST /v1/chat/completions` with deterministic rewrites of the prompt in the last
user message (`"<prompt>, variant k"`, one per line, as many as asked), and `GET /stats` with the request count.
"""

import argparse
import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REQUESTS = {"chat": 0}


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
        self._send(200, {"requests": REQUESTS["chat"]})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        REQUESTS["chat"] += 1
        if ARGS.key and self.headers.get("Authorization") != f"Bearer {ARGS.key}":
            return self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        if ARGS.mode == "fail":
            return self._send(500, {"error": {"message": "model crashed", "type": "server_error"}})
        if ARGS.mode == "slow":
            time.sleep(3)
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        content = "\n".join(f"{k + 1}. {text}" for k, text in enumerate(rewrites(user)))
        self._send(
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", default=None)
    parser.add_argument("--mode", default="ok", choices=["ok", "fail", "slow"])
    ARGS = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()
