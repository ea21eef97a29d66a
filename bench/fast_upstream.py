"""A fast upstream for bench/throughput.py, in its own process: nginx when installed, else aiohttp.

Every request gets 200 with a small chat-completion-like JSON at once (or one whose message is
`answer_kb` KiB), so the upstream is never the bottleneck. nginx runs with a temporary config (`daemon off`, its own prefix);
the fallback is `python bench/fast_upstream.py PORT` (aiohttp.web). `FastUpstream(kind)`:
kind "auto" (nginx, else aiohttp), "nginx" or "aiohttp"; `.url`, `.kind`, `.pids()`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANSWER = '{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"usage":{"total_tokens":3}}'  # noqa: E501




def filler(kib: int) -> str:
    """`kib` KiB of plain ASCII text (a long prompt or answer for the benchmarks)."""
    sentence = "lorem ipsum dolor sit amet, consectetur adipiscing elit. "
    return (sentence * (kib * 1024 // len(sentence) + 1))[:kib * 1024]


def answer_text(answer_kb: int = 0) -> str:
    """The chat completion every request gets: ANSWER, or one whose message is `answer_kb` KiB."""
    return ANSWER.replace('"content":"ok"', f'"content":"{filler(answer_kb)}"') if answer_kb else ANSWER


NGINX_CONF = """worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    default_type application/json;
    {location}
  }}
}}
"""
NGINX_INLINE = "location / {{ return 200 '{answer}'; }}"
# a long answer is a file (an nginx token holds 4 KiB at most); the static handler refuses POST
# with 405, which error_page turns into the file as a 200
NGINX_FILE = ("root {tmp}; location / {{ rewrite ^ /answer.json last; }} "
              "location = /answer.json {{ error_page 405 =200 $uri; }}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class FastUpstream:
    def __init__(self, kind: str = "auto", answer_kb: int = 0):
        self.kind, self.answer_kb = kind, answer_kb
        self._tmp = tempfile.TemporaryDirectory(prefix="ratefleet-upstream-")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> FastUpstream:
        kinds = ["nginx", "aiohttp"] if self.kind == "auto" else [self.kind]
        for kind in kinds:
            port = _free_port()
            proc = self._start_nginx(port) if kind == "nginx" else self._start_aiohttp(port)
            if proc is not None and _answers(port, 10.0) and proc.poll() is None:
                self.proc, self.kind, self.url = proc, kind, f"http://127.0.0.1:{port}"
                return self
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            print(f"fast upstream: {kind} did not start, falling back", file=sys.stderr)
        raise RuntimeError("no fast upstream could be started")

    def _start_nginx(self, port: int) -> subprocess.Popen | None:
        binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
        if binary is None:
            return None
        tmp = Path(self._tmp.name)
        conf = tmp / "nginx.conf"
        answer = answer_text(self.answer_kb)
        if len(answer) < 3000:
            location = NGINX_INLINE.format(answer=answer)
        else:
            (tmp / "answer.json").write_text(answer)
            tmp.chmod(0o755)  # nginx's workers run as another user when started by root
            (tmp / "answer.json").chmod(0o644)
            location = NGINX_FILE.format(tmp=tmp)
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, location=location))
        return subprocess.Popen([binary, "-p", str(tmp), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=open(tmp / "stderr.log", "wb"), start_new_session=True)

    def _start_aiohttp(self, port: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, str(port), str(self.answer_kb)], start_new_session=True)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()


def serve(port: int, answer_kb: int = 0) -> None:
    from aiohttp import web

    text = answer_text(answer_kb)

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=text, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
