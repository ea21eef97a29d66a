"""`[nats]` credentials and TLS turned into nats-py connect options, resolved at connect time.

Secret references (`env:NAME`, `file:PATH`, literal) are read here and nowhere else; the
values go to nats-py only and are never logged. Errors name the field and the reference
(the variable or the file), never a value. nats-py's own options used: `user`/`password`,
`token`, `nkeys_seed_str` (the seed text; `nkeys_seed` would want a path), `user_credentials`
(path of a `.creds` file), `tls` (an `ssl.SSLContext`), `inbox_prefix`
(nats-py 2.16, `nats.aio.client.Client.connect`).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import ConfigError


def resolve_secret(field: str, ref: SecretStr) -> str:
    """The value of a `[nats]` secret reference; ConfigError naming the field and where it looked."""
    raw = ref.get_secret_value()
    if raw.startswith("env:"):
        value = os.environ.get(raw[4:], "")
        if not value:
            raise ConfigError(f"nats.{field}: environment variable {raw[4:]} is not set")
        return value
    if raw.startswith("file:"):
        path = raw[5:]
        try:
            value = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"nats.{field}: cannot read {path} ({getattr(exc, 'strerror', None) or 'not UTF-8'})") from None
        if not value:
            raise ConfigError(f"nats.{field}: {path} is empty")
        return value
    return raw


def _readable(field: str, path: str) -> str:
    if not Path(path).is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"nats.{field}: {path} is not a readable file")
    return path


def tls_context(auth: NatsAuthConfig) -> ssl.SSLContext | None:
    """An SSLContext verifying the server (`tls_ca`, else the system store) and presenting the
    client certificate when `tls_cert`/`tls_key` are set; None when TLS is not configured."""
    if not auth.uses_tls:
        return None
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=_readable("tls_ca", auth.tls_ca) if auth.tls_ca else None)
        if auth.tls_cert and auth.tls_key:
            context.load_cert_chain(_readable("tls_cert", auth.tls_cert), _readable("tls_key", auth.tls_key))
    except ssl.SSLError as exc:
        raise ConfigError(f"nats.tls_*: the CA, certificate or key cannot be used ({exc.reason or exc})") from None
    return context


def connect_options(auth: NatsAuthConfig | None) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` from `auth` ({} when None). Raises ConfigError."""
    if auth is None:
        return {}
    options: dict[str, Any] = {"inbox_prefix": auth.inbox_prefix}
    if auth.user is not None and auth.password is not None:
        options.update(user=auth.user, password=resolve_secret("password", auth.password))
    if auth.token is not None:
        options["token"] = resolve_secret("token", auth.token)
    if auth.nkey_seed is not None:
        options["nkeys_seed_str"] = resolve_secret("nkey_seed", auth.nkey_seed)
    if auth.creds is not None:
        options["user_credentials"] = _readable("creds", auth.creds)
    context = tls_context(auth)
    if context is not None:
        options["tls"] = context
    return options


def secret_values(options: dict[str, Any]) -> list[str]:
    """The secret strings among connect options (to scrub from nats-py's error texts)."""
    return [v for k in ("password", "token", "nkeys_seed_str") if isinstance(v := options.get(k), str) and v]
