"""`[nats]` credentials and TLS: how every role and the client authenticate to NATS.

Secrets (`password`, `token`, `nkey_seed`) are references like key secrets: `env:NAME`,
`file:PATH` or a literal (local use; warns). They are resolved only when connecting
(ratefleet/runtime/nats_auth.py) and are never logged or printed. `creds`, `tls_*` are
file paths. The forms are those of nats-server's client authentication
(https://docs.nats.io/running-a-nats-service/configuration/securing_nats/auth_intro):
user/password, token, NKey (a seed file as written by `nsc`/`nk -gen user`), a
decentralised-JWT `.creds` file, and TLS with an optional client certificate (mutual TLS).
Credentials may also ride in the URL (`nats://user:password@host:4222`, `nats://token@host`);
the URL is then redacted wherever it is shown.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ratefleet.schemas.key_versions import secret_ref_problem

INBOX_PREFIX_PATTERN = r"^_INBOX(\.[A-Za-z0-9_-]+)*$"



def is_literal(ref: SecretStr | None) -> bool:
    """True when a secret reference is a literal value (not `env:`/`file:`)."""
    return ref is not None and not ref.get_secret_value().startswith(("env:", "file:"))


class NatsAuthConfig(BaseModel):
    """Credentials and TLS fields of `[nats]` (NatsConfig adds url, prefix...).

    At most one way to authenticate: `user` + `password`, `token`, `nkey_seed` (a seed
    reference: `file:/run/secrets/fleet.nk` or `env:NAME` holding the `SU...` seed) or
    `creds` (path of a `.creds` file). `inbox_prefix`: the subject prefix of this
    connection's reply inboxes (`_INBOX.<user>` lets the account config give each user only
    its own replies; default `_INBOX`). TLS: `tls_ca` (PEM bundle to verify the server),
    `tls_cert` + `tls_key` (client certificate for mutual TLS); any of them turns TLS on;
    `tls = true` turns it on with the system's CA store.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    token: SecretStr | None = None
    nkey_seed: SecretStr | None = None
    creds: str | None = Field(default=None, min_length=1)
    inbox_prefix: str = Field(default="_INBOX", pattern=INBOX_PREFIX_PATTERN)
    tls: bool = False
    tls_ca: str | None = Field(default=None, min_length=1)
    tls_cert: str | None = Field(default=None, min_length=1)
    tls_key: str | None = Field(default=None, min_length=1)

    @field_validator("password", "token", "nkey_seed")
    @classmethod
    def _ref_form(cls, value: SecretStr | None) -> SecretStr | None:
        problem = None if value is None else secret_ref_problem(value.get_secret_value(), "RATEFLEET_NATS_PASSWORD",
                                                                 "/run/secrets/nats-password")
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_method(self) -> NatsAuthConfig:
        if self.password is not None and self.user is None:
            raise ValueError("nats.password needs nats.user")
        if self.user is not None and self.password is None:
            raise ValueError("nats.user needs nats.password (env:NAME or file:PATH)")
        methods = [name for name, set_ in (("user/password", self.user), ("token", self.token),
                                           ("nkey_seed", self.nkey_seed), ("creds", self.creds)) if set_ is not None]
        if len(methods) > 1:
            raise ValueError(f"nats: use one way to authenticate, not {' and '.join(methods)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("nats.tls_cert and nats.tls_key go together (client certificate and its private key)")
        return self

    @property
    def has_credentials(self) -> bool:
        """True when this config authenticates to NATS (besides anything in the URL) or uses TLS."""
        return any(v is not None for v in (self.user, self.token, self.nkey_seed, self.creds)) or self.uses_tls

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(v is not None for v in (self.tls_ca, self.tls_cert, self.tls_key))

    def literal_secrets(self) -> list[str]:
        """Names of the fields holding a literal secret (they warn: use env:/file: outside local tests)."""
        return [name for name in ("password", "token", "nkey_seed") if is_literal(getattr(self, name))]
