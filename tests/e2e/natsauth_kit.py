"""A nats-server run with examples/nats-accounts.conf (or another auth config), a small real
HTTP upstream, and helpers to watch permission violations from the client side."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import nats
from aiohttp import web
from fleetkit import SECRETS

from ratefleet.runtime.embedded import EmbeddedNats

ROOT = Path(__file__).resolve().parents[2]
ACCOUNTS_CONF = ROOT / "examples" / "nats-accounts.conf"
PASSWORDS = {"fleet": "fleet-pw-Q7f3K9xLm2", "producer": "producer-pw-Z8r4T6yWn1", "operator": "operator-pw-H5j2P0cVb7"}
KEY_OF = {secret: key_id for key_id, secret in SECRETS.items()}


def start_accounts_server(tmp: Path, conf: Path = ACCOUNTS_CONF) -> EmbeddedNats:
    """nats-server -c `conf` with the role passwords in its environment (the conf reads them)."""
    for user, password in PASSWORDS.items():
        os.environ[f"RATEFLEET_{user.upper()}_PASSWORD"] = password
    return EmbeddedNats(tmp / "nats", extra_args=("-c", str(conf))).start()


def role_nats(user: str) -> dict:
    """The [nats] section of `user` (password from $RF_NATS_PW_<USER>, its own inbox prefix)."""
    os.environ[f"RF_NATS_PW_{user.upper()}"] = PASSWORDS[user]
    return {"user": user, "password": f"env:RF_NATS_PW_{user.upper()}", "inbox_prefix": f"_INBOX.{user}"}


@dataclass
class Upstream:
    """A real HTTP upstream recording (key id, path, model) per call; model "big" gets a 2 MB body."""

    calls: list[tuple[str, str, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = await request.json() if request.can_read_body else {}
        model = body.get("model", "")
        self.calls.append((KEY_OF.get(auth, "?" if not auth else "unknown-secret"), request.path, model))
        if model == "big":
            return web.json_response({"data": "x" * (2 << 20)})
        return web.json_response({"choices": [{"message": {"content": "hi"}}], "usage": {"total_tokens": 3}})


async def serve(upstream: Upstream) -> web.AppRunner:
    app = web.Application(client_max_size=8 << 20)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return runner


@dataclass
class Intruder:
    """A raw nats-py connection of some user that records the server's refusals (-ERR
    'Permissions Violation ...', delivered to error_cb)."""

    nc: nats.aio.client.Client | None = None
    errors: list[str] = field(default_factory=list)

    async def connect(self, url: str, user: str, inbox: str | None = None) -> Intruder:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(url, user=user, password=PASSWORDS[user], error_cb=on_error,
                                     inbox_prefix=inbox or f"_INBOX.{user}", allow_reconnect=False)
        return self

    async def refused(self, what: str, subject: str, timeout: float = 5.0) -> bool:
        """True once the server reported a `what` ("publish"/"subscription") violation on `subject`."""
        needle = f'permissions violation for {what} to "{subject}"'.lower()
        for _ in range(int(timeout / 0.05)):
            if any(needle in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False

    async def publish_refused(self, subject: str, payload: dict | bytes, headers: dict | None = None) -> bool:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.nc.publish(subject, data, headers=headers)
        await self.nc.flush()
        return await self.refused("publish", subject)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
