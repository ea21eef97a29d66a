"""`ratefleet config check|push|show|watch` through the real command and a real nats-server:
exit codes, the file/field/why of a bad file, literal secrets refused, revisions kept, a
push that fails validation changes nothing, and a watched file pushed on each good edit."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time

import pytest
import tomli_w

pytestmark = [pytest.mark.timeout(240)]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True, timeout=timeout)


def config(rps: float = 5, *, secret: str = "env:K1", extra_key: bool = False) -> dict:
    keys = [{"id": "k1", "secret": secret, "rps": rps}]
    if extra_key:
        keys.append({"id": "k2", "secret": "file:/run/secrets/k2", "rps": 3})
    return {"nats": {"url": "nats://127.0.0.1:1"}, "upstreams": {"mock": {"base_url": "http://127.0.0.1:8900"}},
            "pools": {"shared": {"keys": keys}}}


def write(path, data: dict):
    path.write_text(tomli_w.dumps(data))
    return path


def test_check_passes_a_good_file_and_names_file_field_and_why_for_a_bad_one(tmp_path):
    good = cli("config", "check", str(write(tmp_path / "good.toml", config())))
    assert good.returncode == 0, good.stderr
    assert "valid (1 upstream(s), 1 pool(s), 1 key(s)" in good.stdout
    bad_path = write(tmp_path / "bad.toml", config(rps=-1))
    bad = cli("config", "check", str(bad_path))
    assert bad.returncode == 2
    assert f"{bad_path}: pools.shared.keys.0.rps: Input should be greater than 0" in bad.stderr, bad.stderr
    (tmp_path / "broken.toml").write_text("[pools\n")
    broken = cli("config", "check", str(tmp_path / "broken.toml"))
    assert broken.returncode == 2 and "broken.toml: not valid TOML" in broken.stderr
    literal = cli("config", "check", str(write(tmp_path / "lit.toml", config(secret="sk-live-123"))))
    assert literal.returncode == 0 and "config push` refuses it" in literal.stdout
    assert "sk-live-123" not in literal.stdout + literal.stderr


def test_push_stores_revisions_and_a_refused_push_changes_nothing(tmp_path, nats_server):
    url = ["--nats", nats_server.url]
    nothing = cli("config", "show", *url)
    assert nothing.returncode == 1 and "no config was pushed yet" in nothing.stderr
    assert _streams(nats_server.url) == []  # reading made no bucket (it created KV_ratefleet_config)
    literal = cli("config", "push", str(write(tmp_path / "lit.toml", config(secret="sk-live-123"))), *url)
    assert literal.returncode == 2 and "literal secret at pools.shared.keys.0.secret (key 'k1')" in literal.stderr
    assert "sk-live-123" not in literal.stderr + literal.stdout
    assert cli("config", "show", *url).returncode == 1  # nothing stored

    first = cli("config", "push", str(write(tmp_path / "a.toml", config(rps=5))), *url)
    assert first.returncode == 0 and "config revision 1" in first.stdout, first.stderr
    again = cli("config", "push", str(tmp_path / "a.toml"), *url)
    assert again.returncode == 0 and "unchanged: config revision 1" in again.stdout
    second = cli("config", "push", str(write(tmp_path / "b.toml", config(rps=9, extra_key=True))), *url)
    assert second.returncode == 0 and "config revision 2" in second.stdout

    bad = cli("config", "push", str(write(tmp_path / "bad.toml", config(rps=-1))), *url)
    assert bad.returncode == 2 and "pools.shared.keys.0.rps" in bad.stderr
    (tmp_path / "nats-only.toml").write_text(f'[nats]\nurl = "{nats_server.url}"\n')
    keyless = cli("config", "push", str(tmp_path / "nats-only.toml"), *url)
    checked = cli("config", "check", str(tmp_path / "nats-only.toml"))
    # an operations trial: it was pushed and took every key; `check` called it valid with no word
    assert keyless.returncode == 2 and "refused: it defines no API keys" in keyless.stderr, keyless.stderr
    assert checked.returncode == 0 and "warning: no API keys" in checked.stderr, checked.stderr
    current = json.loads(cli("config", "show", "--json", *url).stdout)
    assert current["revision"] == 2  # the refused pushes made no revision
    assert current["config"]["pools"]["shared"]["keys"][1]["secret"] == "file:/run/secrets/k2"
    assert "nats" not in current["config"]  # how a process reaches NATS is never stored

    moved = config(rps=9, extra_key=True)
    moved["upstreams"] = {"openai": moved["upstreams"]["mock"]}
    moved["pools"]["shared"]["upstream"] = "openai"
    third = cli("config", "push", str(write(tmp_path / "c.toml", moved)), *url)
    assert third.returncode == 0 and "config revision 3" in third.stdout, third.stderr
    assert "warning: upstream(s) mock are not in this revision: queued jobs naming them end `invalid`" in third.stderr

    shown = cli("config", "show", "--revision", "1", *url)
    assert shown.returncode == 0 and shown.stdout.startswith("# config revision 1, pushed ")
    assert "rps = 5" in shown.stdout and "env:K1" in shown.stdout
    missing = cli("config", "show", "--revision", "99", *url)
    assert missing.returncode == 1 and "revision 99 is not in the config bucket" in missing.stderr
    # what to do next: see which revision there is (it said "`ratefleet config push FILE` stores one")
    assert "(it keeps the last 64 revisions); `ratefleet config show` prints the current one" in missing.stderr


def test_watch_pushes_each_good_edit_and_reports_a_bad_one(tmp_path, nats_server):
    url = ["--nats", nats_server.url]
    path = write(tmp_path / "fleet.toml", config(rps=5))
    with watching(path, url, tmp_path / "watch.log"):
        _wait_revision(url, 1)
        write(path, config(rps=-2))  # a bad edit: reported, not pushed
        _wait_log(tmp_path / "watch.log", "config file not pushed")
        path.write_text("")  # an editor's truncate-then-write (an operations trial: pushed, every key gone)
        _wait_log(tmp_path / "watch.log", "defines no API keys")
        write(path, config(rps=7))
        _wait_revision(url, 2)
        shown = json.loads(cli("config", "show", "--json", *url).stdout)
        assert shown["config"]["pools"]["shared"]["keys"][0]["rps"] == 7
    assert "pools.shared.keys.0.rps" in (tmp_path / "watch.log").read_text()


def with_callers(data: dict) -> dict:
    """`data` with a caller whose key this machine has (RF_CLI_APP) and one whose variable is unset."""
    return {**data, "tiers": {"vip": {"pools": ["shared"]}},
            "callers": {"app": {"key": "env:RF_CLI_APP", "tier": "vip"},
                        "tpm": {"key": "env:RF_CLI_TPM_UNSET", "tier": "vip"}}}


def test_check_warns_about_a_caller_key_not_resolvable_here_and_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("RF_CLI_APP", "rk-app-cli")
    done = cli("config", "check", str(write(tmp_path / "callers.toml", with_callers(config()))))
    assert done.returncode == 0, done.stderr
    assert ("warning: callers.tpm.key: RF_CLI_TPM_UNSET not set on this machine: a gateway started here leaves "
            "caller 'tpm' out") in done.stderr
    assert "callers.app" not in done.stderr


def test_check_notes_a_caller_without_upstreams_in_a_fleet_of_several(tmp_path, monkeypatch):
    """Such a caller can call only with the x-ratefleet-upstream header (else 400
    upstream_required), which `config check` called simply "valid" (a gateway trial)."""
    monkeypatch.setenv("RF_CLI_APP", "rk-app-cli")
    monkeypatch.setenv("RF_CLI_TPM_UNSET", "rk-tpm-cli")
    data = with_callers(config())
    data["upstreams"]["other"] = {"base_url": "http://127.0.0.1:8901"}
    data["pools"]["shared"]["upstream"] = "mock"
    data["pools"]["alt"] = {"upstream": "other", "keys": [{"id": "a1", "secret": "env:K1", "rps": 5}]}
    data["tiers"]["vip"]["pools"] = ["shared", "alt"]
    done = cli("config", "check", str(write(tmp_path / "two.toml", data)))
    assert done.returncode == 0, done.stderr
    assert ("note: callers.app names no upstreams while 2 are configured: each of its requests must say which in "
            "the x-ratefleet-upstream header (else 400 upstream_required)") in done.stdout
    data["callers"]["app"]["upstreams"] = ["other"]
    data["callers"]["tpm"]["upstreams"] = ["mock"]
    quiet = cli("config", "check", str(write(tmp_path / "two.toml", data)))
    assert quiet.returncode == 0 and "names no upstreams" not in quiet.stdout


def test_watch_warns_about_a_pushed_caller_key_not_resolvable_here(tmp_path, nats_server, monkeypatch):
    monkeypatch.setenv("RF_CLI_APP", "rk-app-cli")
    url = ["--nats", nats_server.url]
    path = write(tmp_path / "fleet.toml", config(rps=5))
    with watching(path, url, tmp_path / "watch.log"):
        _wait_revision(url, 1)
        write(path, with_callers(config(rps=5)))  # the user trial's edit: a caller appended, its variable unset
        _wait_revision(url, 2)  # a warning, not a refusal: the gateway may run on another machine
        _wait_log(tmp_path / "watch.log", "caller key not usable on this machine")
    text = (tmp_path / "watch.log").read_text()
    assert '"caller": "tpm"' in text and "RF_CLI_TPM_UNSET not set" in text and '"caller": "app"' not in text


@contextlib.contextmanager
def watching(path, url: list[str], log_path):
    """`ratefleet config watch PATH` running, its output in `log_path`, stopped (SIGTERM) after."""
    with open(log_path, "wb") as log:
        watcher = subprocess.Popen([sys.executable, "-m", "ratefleet", "config", "watch", str(path), *url],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            yield watcher
        finally:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(timeout=10)


def _wait_revision(url: list[str], revision: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = cli("config", "show", "--json", *url)
        if done.returncode == 0 and json.loads(done.stdout)["revision"] == revision:
            return
        time.sleep(0.3)
    raise AssertionError(f"revision {revision} not stored within {timeout}s")


def _wait_log(path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged within {timeout}s: {path.read_text()[-2000:]}")


def _streams(url: str) -> list[str]:
    """The names of the streams on the server at `url`."""
    import anyio
    import nats

    async def names() -> list[str]:
        nc = await nats.connect(url)
        try:
            return [info.config.name for info in await nc.jetstream().streams_info()]
        finally:
            await nc.close()

    return anyio.run(names)


@pytest.mark.anyio
async def test_a_push_leaving_out_a_tier_with_queued_jobs_says_how_many_wait(tmp_path, nats_server):
    """An operator's trial: a push without [tiers.normal] while 2,360 normal jobs were queued
    printed only "applied"; nothing runs them until the tier comes back."""
    from ratefleet import Client
    from ratefleet.runtime.streams import ensure_topology
    from ratefleet.schemas.config import parse_config

    url = ["--nats", nats_server.url, "--wait-s", "0"]
    tiers = {"vip": {"weight": 4}, "normal": {"weight": 1}}
    assert cli("config", "push", str(write(tmp_path / "a.toml", {**config(), "tiers": tiers})), *url).returncode == 0
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({**config(), "tiers": tiers}))
        for n in range(7):
            await client.submit({"request": {"path": "/v1/x", "json": {"n": n}}}, "normal")
    dropped = cli("config", "push", str(write(tmp_path / "b.toml", {**config(), "tiers": {"vip": {"weight": 4}}})), *url)
    assert dropped.returncode == 0, dropped.stderr
    assert ("warning: tier 'normal' is not in this revision and 7 of its jobs are queued: nothing runs them until "
            "[tiers.normal] is pushed again") in dropped.stderr
    back = cli("config", "push", str(tmp_path / "a.toml"), *url)
    assert "warning" not in back.stderr
