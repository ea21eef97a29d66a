"""Secrets a worker cannot use are found at start, with a reason that never holds the value."""

from __future__ import annotations

from ratefleet.schemas.config import parse_config
from ratefleet.workers.secrets import SecretResolver, header_problem

SECRET = "sk-live-Zq93nTQ"


def config(tmp_path, monkeypatch):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "good").write_text(SECRET + "\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    monkeypatch.setenv("KS_GOOD", SECRET)
    monkeypatch.setenv("KS_NEWLINE", SECRET + "\r\nX-Evil: 1")
    monkeypatch.setenv("KS_UNICODE", SECRET + "✓")
    monkeypatch.delenv("KS_UNSET", raising=False)
    keys = {
        "good_env": "env:KS_GOOD", "good_file": f"file:{tmp_path / 'good'}", "unset": "env:KS_UNSET",
        "newline": "env:KS_NEWLINE", "unicode": "env:KS_UNICODE", "empty": f"file:{tmp_path / 'empty'}",
        "missing": f"file:{tmp_path / 'nope'}", "binary": f"file:{tmp_path / 'binary'}",
    }
    return parse_config({"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
                         "pools": {"p": {"keys": [{"id": k, "secret": v, "rps": 1} for k, v in keys.items()]}}})


def test_check_all_names_every_unusable_secret_and_why(tmp_path, monkeypatch):
    problems = SecretResolver(config(tmp_path, monkeypatch)).check_all()
    assert set(problems) == {"unset", "newline", "unicode", "empty", "missing", "binary"}
    assert problems["unset"] == "KS_UNSET not set"
    assert problems["newline"] == "KS_NEWLINE contains a line break (CR/LF)"
    assert "outside latin-1" in problems["unicode"]
    assert problems["empty"].endswith("empty") and "unreadable" in problems["missing"]
    assert "unreadable" in problems["binary"]
    assert not any(SECRET in reason for reason in problems.values())


def test_usable_secrets_resolve(tmp_path, monkeypatch):
    resolver = SecretResolver(config(tmp_path, monkeypatch))
    assert resolver.get("good_env") == SECRET and resolver.get("good_file") == SECRET


def test_header_problem_follows_rfc9110_field_values():
    assert header_problem("sk-abc\tdef é") is None  # HTAB, SP and obs-text (latin-1) are allowed
    assert header_problem("a\nb") and header_problem("a\x00b") and header_problem("a\x7fb")
    assert header_problem("日本")
