#!/usr/bin/env python3
"""A stand-in for llama-server, for lifecycle tests that must not wait for a real model.

It accepts llama-server's command line (only --host/--port/-a are used) and serves /health, /metrics,
/v1/chat/completions and /completion like the real one. FAKE_MODE picks a failure to simulate:
  ok (default) | crash (exit 3 at startup) | hang (never healthy; forks a child that also hangs)
  | die_on_chat (exits on the first chat request). FAKE_PIDS=path: write "server_pid child_pid" there.
FAKE_ANSWER: the chat reply text (default "The answer is (A)").
"""
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def arg(flag, default=None):
    argv = sys.argv[1:]
    return argv[argv.index(flag) + 1] if flag in argv else default


MODE = os.environ.get("FAKE_MODE", "ok")
ANSWER = os.environ.get("FAKE_ANSWER", "The answer is (A)")
STATS = {"prompt": 0, "predicted": 0}
PROMPT_S_PER_TOKEN, DECODE_S_PER_TOKEN = 0.001, 0.01  # -> 1000 tok/s prefill, 100 tok/s decode


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        sys.stderr.write("fake: " + (a[0] % a[1:]) + "\n")

    def reply(self, code, body, ctype="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self.reply(200, {"status": "ok"})
        if self.path == "/metrics":
            p, d = STATS["prompt"], STATS["predicted"]
            text = (f"# HELP llamacpp:prompt_tokens_total x\nllamacpp:prompt_tokens_total {p}\n"
                    f"llamacpp:prompt_seconds_total {p * PROMPT_S_PER_TOKEN}\n"
                    f"llamacpp:tokens_predicted_total {d}\nllamacpp:tokens_predicted_seconds_total {d * DECODE_S_PER_TOKEN}\n"
                    'llamacpp:labelled{slot="0"} 7\n')
            return self.reply(200, text, "text/plain")
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/v1/chat/completions":
            if MODE == "die_on_chat":
                os._exit(9)
            prompt_n = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            out_n = len(ANSWER.split())
            STATS["prompt"] += prompt_n
            STATS["predicted"] += out_n
            return self.reply(200, {"choices": [{"message": {"role": "assistant", "content": ANSWER},
                                                 "finish_reason": "stop"}],
                                    "usage": {"prompt_tokens": prompt_n, "completion_tokens": out_n}})
        if self.path == "/completion":
            n = int(body.get("n_predict", 16))
            return self.reply(200, {"content": "x" * n, "timings": {
                "prompt_n": 40, "prompt_per_second": 1 / PROMPT_S_PER_TOKEN,
                "predicted_n": n, "predicted_per_second": 1 / DECODE_S_PER_TOKEN}})
        self.reply(404, {"error": "not found"})


def main():
    child = None
    if "--version" in sys.argv:
        print("version: 0 (fake)")
        return
    if MODE == "crash":
        print("fake: error: failed to load model 'x.gguf'", file=sys.stderr, flush=True)
        sys.exit(3)
    if MODE == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if os.environ.get("FAKE_PIDS"):
        with open(os.environ["FAKE_PIDS"], "w") as f:
            f.write(f"{os.getpid()} {child.pid if child else 0}\n")
    if MODE == "hang":
        time.sleep(600)
        return
    server = ThreadingHTTPServer((arg("--host", "127.0.0.1"), int(arg("--port", "8080"))), Handler)
    print(f"fake: listening on {server.server_address}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
