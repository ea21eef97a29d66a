"""Per-job CPU in the cyclic garbage collector: an upstream call leaves no reference cycle
behind (workers/executor.py `_unlink`), and a role process freezes what it holds after
start-up and collects less often (ratefleet/runtime/gctune.py)."""

from __future__ import annotations

import gc
import socket

import httpx
import pytest
from aiohttp import web

from ratefleet.runtime.gctune import YOUNG_THRESHOLD, quiet_gc
from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor, build_client

JOB = Job.model_validate({"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}})


def _cyclic_garbage_of(kind: type) -> int:
    """How many objects of `kind` the collector found unreachable (kept in gc.garbage)."""
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.garbage)


async def _calls_leave_cycles(executor: UpstreamExecutor, upstream: UpstreamConfig, calls: int) -> int:
    await executor.call(JOB, upstream, "sk-secret")  # connections and caches are made before counting
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(calls):
            result = await executor.call(JOB, upstream, "sk-secret")
            assert result.kind == "ok" and result.response.json_body == {"ok": True}
        return _cyclic_garbage_of(httpx.Response)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.anyio
async def test_an_upstream_call_over_the_aiohttp_transport_leaves_no_cycle_for_the_collector():
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    client = build_client("aiohttp", 4, ["Authorization"])
    try:
        executor = UpstreamExecutor(client)
        assert await _calls_leave_cycles(executor, UpstreamConfig(base_url=f"http://127.0.0.1:{port}"), 20) == 0
    finally:
        await client.aclose()
        await runner.cleanup()


@pytest.mark.anyio
async def test_an_upstream_call_over_a_mock_transport_leaves_no_cycle_for_the_collector():
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": True}))
    async with httpx.AsyncClient(transport=transport) as client:
        executor = UpstreamExecutor(client)
        assert await _calls_leave_cycles(executor, UpstreamConfig(base_url="https://api.example.test"), 20) == 0


def test_quiet_gc_freezes_what_the_process_holds_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        assert quiet_gc() == before
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _passes_while(block) -> int:
    """Collector passes made while `block()` runs (gc.callbacks)."""
    passes = []

    def count(phase, info):
        if phase == "start":
            passes.append(info["generation"])

    gc.callbacks.append(count)
    try:
        block()
    finally:
        gc.callbacks.remove(count)
    return len(passes)


def _allocate_containers() -> None:
    junk = [[[i]] for i in range(50_000)]  # 100,000 containers: hundreds of young passes at 700
    del junk


def test_imports_without_gc_makes_no_pass_and_leaves_the_collector_as_it_found_it():
    from ratefleet.runtime.gctune import imports_without_gc

    def inside():
        with imports_without_gc():
            _allocate_containers()

    assert gc.isenabled()
    assert _passes_while(_allocate_containers) > 0  # (the measure works: the same block, collector on)
    assert _passes_while(inside) == 0
    assert gc.isenabled()
    with pytest.raises(ImportError), imports_without_gc():
        import ratefleet_no_such_module  # noqa: F401
    assert gc.isenabled()  # back on after a failed import too
    gc.disable()
    try:
        with imports_without_gc():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_the_ratefleet_command_and_python_m_ratefleet_start_with_imports_without_gc():
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ratefleet"] == "ratefleet.__main__:main"
    # each collector pass notes whether ratefleet.cli was importing (False) or done (True, its `main` defined)
    probe = ("import gc, sys\n"
             "passes = []\n"
             "cli = lambda: sys.modules.get('ratefleet.cli')\n"
             "gc.callbacks.append(lambda phase, info: passes.append(hasattr(cli(), 'main') if cli() else None)"
             " if phase == 'start' else None)\n"
             "from ratefleet.__main__ import main\n"
             "sys.argv = ['ratefleet', '--version']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('during the import', passes.count(False), 'after', passes.count(True), 'enabled', gc.isenabled())\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("during the import 0 after "), done.stdout
    assert done.stdout.strip().endswith("enabled True"), done.stdout
