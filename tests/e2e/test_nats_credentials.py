"""NATS credentials over real nats-servers and real processes: a password in the URL (even one
holding "@") is never written to any log, including across a forced disconnect, nor printed
by the CLI; tokens, NKey seeds and TLS client certificates from [nats] work for roles and the
Client and are never shown."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nkeys
import pytest
from fleetkit import FleetKit, chat_job, mock_keys, wait_for_leader

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock
from ratefleet.runtime.embedded import EmbeddedNats
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import NatsUnavailable

pytestmark = [pytest.mark.timeout(180), pytest.mark.anyio]
PASSWORD = "pw-Secr3t@Hidden-9f2kQ"  # an "@" inside: a redaction stopping at the first "@" shows the rest
FRAGMENTS = (PASSWORD, "Secr3t", "Hidden-9f2kQ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


async def until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return False


async def test_a_password_in_the_url_is_never_logged_or_printed(tmp_path):
    port = free_port()
    auth_args = ("--user", "fleet", "--pass", PASSWORD)
    server = EmbeddedNats(tmp_path / "nats", port=port, extra_args=auth_args).start()
    url = f"nats://fleet:{PASSWORD}@127.0.0.1:{port}"
    printed: list[str] = []
    with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10))) as upstream:
        kit = FleetKit(tmp_path, url, upstream.url)
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            async with await Client.connect(url) as client:
                await wait_for_leader(client, 60)
                assert (await client.request(chat_job(1), "vip", timeout=60)).ok
            server.stop()  # every process is cut off, then reconnects with the URL's credentials
            await asyncio.sleep(1.0)
            server = EmbeddedNats(tmp_path / "nats", port=port, extra_args=auth_args).start()
            assert await until(lambda: kit.logs().count("nats reconnected") >= 2, 60), kit.logs()[-2000:]
            async with await Client.connect(url) as client:
                assert (await client.request(chat_job(2), "vip", timeout=60)).ok
            env = {**kit.env(), "RATEFLEET_NATS_URL": url}
            ok = await asyncio.to_thread(cli, "status", env=env)
            assert ok.returncode == 0, ok.stderr
            wrong = await asyncio.to_thread(cli, "status", "--nats", url.replace("Secr3t", "Wrong1"), env=env)
            dead = await asyncio.to_thread(cli, "submit", str(tmp_path / "ratefleet.toml"), "--tier", "vip",
                                           "--nats", f"fleet:{PASSWORD}@127.0.0.1:{free_port()}", env=env)
            up = await asyncio.to_thread(cli, "up", "--config", str(kit.config_path), "--nats",
                                         f"nats://fleet:{PASSWORD}@127.0.0.1:{free_port()}", env=env)
            # an operations trial: with a wrong password `up` restarted every child every few seconds, forever
            up_wrong = await asyncio.to_thread(cli, "up", "--config", str(kit.config_path), "--nats",
                                               url.replace("Secr3t", "Wrong1"), "--http-host", "", env=env)
            for done in (ok, wrong, dead, up, up_wrong):
                printed += [done.stdout, done.stderr]
            assert wrong.returncode == 1 and "refused the credentials" in wrong.stderr
            assert up_wrong.returncode == 2 and "refused the credentials" in up_wrong.stderr, up_wrong.stderr
            assert "restarting" not in up_wrong.stderr
            assert dead.returncode != 0 and "fleet:***@127.0.0.1" in dead.stderr + dead.stdout
            assert up.returncode == 2 and "does not start an open embedded server" in up.stderr
        finally:
            kit.stop()
            server.stop()
    logs = kit.logs()
    assert logs.count("nats disconnected") >= 2 and "fleet:***@127.0.0.1" in logs
    for fragment in FRAGMENTS:
        assert fragment not in logs and not any(fragment in text for text in printed), fragment


async def test_token_and_nkey_seed_from_files_for_roles_and_the_client(tmp_path):
    token, raw_seed = "tok-Zq81LmVx03Bc", nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    seed, public = raw_seed.decode(), nkeys.from_seed(bytearray(raw_seed)).public_key.decode()
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "user.nk").write_text(seed + "\n")
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    tokened = EmbeddedNats(tmp_path / "nats-token", extra_args=("--auth", token)).start()
    nkeyed = EmbeddedNats(tmp_path / "nats-nkey", extra_args=("-c", str(conf))).start()
    try:
        with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10))) as upstream:
            kit = FleetKit(tmp_path, tokened.url, upstream.url, overrides={"nats": {"token": f"file:{tmp_path / 'token'}"}})
            try:
                kit.dispatcher("d1")
                kit.worker("w1")
                token_auth = NatsAuthConfig(token=f"file:{tmp_path / 'token'}")  # type: ignore[arg-type]
                async with await Client.connect(tokened.url, auth=token_auth) as client:
                    await wait_for_leader(client, 60)
                    assert (await client.request(chat_job(1), "vip", timeout=60)).ok
            finally:
                kit.stop()
        seed_auth = NatsAuthConfig(nkey_seed=f"file:{tmp_path / 'user.nk'}")  # type: ignore[arg-type]
        async with await Client.connect(nkeyed.url, auth=seed_auth) as client:
            await client.nc.flush(timeout=5)
        for anonymous in (tokened.url, nkeyed.url):
            with pytest.raises(NatsUnavailable, match="refused the credentials"):
                await Client.connect(anonymous)
    finally:
        tokened.stop()
        nkeyed.stop()
    logs = kit.logs()
    assert "became leader" in logs and token not in logs and seed not in logs


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
async def test_tls_with_a_client_certificate(tmp_path):
    pki = make_pki(tmp_path)
    server = EmbeddedNats(tmp_path / "nats", extra_args=(
        "--tls", "--tlscert", str(pki["server.pem"]), "--tlskey", str(pki["server.key"]),
        "--tlscacert", str(pki["ca.pem"]), "--tlsverify")).start()
    try:
        good = NatsAuthConfig(tls_ca=str(pki["ca.pem"]), tls_cert=str(pki["client.pem"]), tls_key=str(pki["client.key"]))
        async with await Client.connect(server.url, auth=good) as client:
            await client.nc.flush(timeout=5)
            assert client.nc.connected_url is not None
        without_cert = NatsAuthConfig(tls_ca=str(pki["ca.pem"]))
        with pytest.raises(NatsUnavailable):
            await Client.connect(server.url, auth=without_cert)
    finally:
        server.stop()


def make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    paths = {name: tmp / name for name in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (tmp / f"{name}.ext").write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return paths



async def test_credentials_in_the_url_win_over_those_of_the_nats_section(tmp_path):
    """`--nats nats://user:pass@host` on the command line over a config file whose [nats] names
    another user (an operator's trial: the file's password won, nats-py sends its `user`/`password`
    options before a URL's user info, and the command was refused)."""
    port = free_port()
    server = EmbeddedNats(tmp_path / "nats", port=port, extra_args=("--user", "fleet", "--pass", PASSWORD)).start()
    url = f"nats://fleet:{PASSWORD}@127.0.0.1:{port}"
    stale = NatsAuthConfig(user="fleet", password="an-old-password")  # type: ignore[arg-type]
    tokened = NatsAuthConfig(token="some-token")  # type: ignore[arg-type]
    try:
        for auth in (stale, tokened):
            async with await Client.connect(url, auth=auth) as client:
                await client.nc.flush(timeout=5)
        with pytest.raises(NatsUnavailable, match="refused the credentials"):  # without them in the URL: the section's
            await Client.connect(f"nats://127.0.0.1:{port}", auth=stale)
        config = tmp_path / "producer.toml"
        config.write_text('[nats]\nuser = "fleet"\npassword = "an-old-password"\n')
        run = cli("results", "nothing-here", "--nats", url, "--config", str(config), env=os.environ.copy())
        assert "refused" not in run.stderr, run.stderr
        assert PASSWORD not in run.stdout + run.stderr
    finally:
        server.stop()
