"""Every configuration a user can copy is valid: each ```toml block of the README and each file
in examples/ loads with the real config loader; compose.yaml follows the compose specification
(JSON schema vendored by check-jsonschema, since no Docker engine is available here), keeps NATS
off the host's interfaces, and every path it and the README use exists in the image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from ratefleet.schemas import Job, load_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TOML_BLOCKS = re.findall(r"^```toml\n(.*?)^```", README, re.S | re.M)
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


@pytest.fixture
def secrets_env(monkeypatch):
    """Dummy values for every env: secret the examples name, no ambient config or NATS URL.

    load_config does not resolve secrets today (workers do); the dummies keep this test about
    validity if it ever starts to."""
    names = set()
    for text in [*TOML_BLOCKS, *(p.read_text() for p in EXAMPLES)]:
        names |= set(re.findall(r'"env:([A-Za-z_][A-Za-z0-9_]*)"', text))
    for name in names:
        monkeypatch.setenv(name, "dummy-not-a-key")
    for name in ("RATEFLEET_CONFIG", "RATEFLEET_NATS_URL"):
        monkeypatch.delenv(name, raising=False)


def _load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example must not teach a literal secret
        return load_config(path)


def test_the_readme_and_examples_have_configs_to_check():
    assert len(TOML_BLOCKS) >= 1 and "[pools." in TOML_BLOCKS[0]
    assert {p.name for p in EXAMPLES} >= {"local.toml", "compose.toml", "openai.toml"}


@pytest.mark.parametrize("index", range(len(TOML_BLOCKS)), ids=[f"readme-block-{i}" for i in range(len(TOML_BLOCKS))])
def test_every_readme_toml_block_loads(index, tmp_path, secrets_env):
    path = tmp_path / "ratefleet.toml"
    path.write_text(TOML_BLOCKS[index])
    config = _load(path)
    assert config.keys(), "a config example without keys teaches nothing"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_loads(path, secrets_env):
    config = _load(path)
    assert config.keys()
    for key in config.keys().values():
        assert key.secret.get_secret_value().startswith("env:"), key.id


def test_tiers_the_readme_commands_use_exist_in_its_config(tmp_path, secrets_env):
    path = tmp_path / "ratefleet.toml"
    path.write_text(TOML_BLOCKS[0])
    tiers = set(_load(path).tiers)
    used = set(re.findall(r"ratefleet (?:submit|request)[^\n]*--tier ([a-z][\w-]*)", README))  # not the table's placeholder T
    assert used and used <= tiers, used - tiers


def test_openai_example_is_a_real_provider_setup(secrets_env):
    config = _load(ROOT / "examples" / "openai.toml")
    assert [u.base_url for u in config.upstreams.values()] == ["https://api.openai.com"]
    assert list(config.tiers) == ["vip", "normal", "guest"]
    assert config.tier_pools("vip")[0] != config.tier_pools("normal")[0]  # vip has keys of its own first
    for key in config.keys().values():
        # under a tier-1 organization's 500 requests / 200,000 tokens per minute (gpt-4o-mini)
        assert key.rps * 60 < 500 and key.cost_per_minute and key.cost_per_minute < 200_000, key.id


# -- compose.yaml ------------------------------------------------------------------------------

COMPOSE = ROOT / "compose.yaml"


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    return subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_compose_file_follows_the_compose_specification(tmp_path):
    done = _check_compose(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "compose.yaml"  # the validator does look: a misspelt service key fails
    broken.write_text(COMPOSE.read_text().replace("    depends_on: [nats]\n", "    depends_ons: [nats]\n", 1))
    failed = _check_compose(broken)
    assert failed.returncode != 0 and "depends_ons" in failed.stdout + failed.stderr


def _compose() -> dict:
    return YAML(typ="safe").load(COMPOSE.read_text())


def test_compose_keeps_nats_off_the_hosts_interfaces():
    nats = _compose()["services"]["nats"]
    published = [str(p) for p in nats.get("ports", [])]
    assert all(p.startswith("127.0.0.1:") for p in published), published


def _image_paths() -> dict[str, Path]:
    """Image path -> repo path for every COPY of the Dockerfile (relative to its WORKDIR)."""
    workdir, copied = "/", {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["WORKDIR"]:
            workdir = words[1]
        elif words[:1] == ["COPY"] and not any(w.startswith("--") for w in words):
            *sources, dest = words[1:]
            target = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest.rstrip('/') or ''}"
            for source in sources:
                key = target.rstrip("/") + "/" + source if dest.endswith("/") or len(sources) > 1 else target
                copied[key.replace("/./", "/").rstrip("/")] = ROOT / source
    return copied


def _in_image(path: str, mounts: set[str]) -> bool:
    if path in mounts:
        return True
    for image_path, source in _image_paths().items():
        if path == image_path:
            return source.exists()
        if path.startswith(image_path + "/"):
            return (source / path[len(image_path) + 1:]).exists()
    return False


def test_every_path_compose_and_the_readme_use_exists():
    services = _compose()["services"]
    mounts = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source}"
            mounts.add(target)
        for word in service.get("command", []):
            if word.startswith("/app/"):
                assert _in_image(word, mounts), f"{name}: {word}"
    documented = set(re.findall(r"(/app/[\w./-]+)", COMPOSE.read_text() + README))
    assert "/app/examples/jobs.jsonl" in documented
    missing = [p for p in sorted(documented) if not _in_image(p.rstrip("."), mounts)]
    assert not missing, f"not in the image: {missing}"


def test_the_compose_jobs_file_is_valid_for_the_compose_config(secrets_env):
    tiers = _load(ROOT / "examples" / "compose.toml").tiers
    assert "normal" in tiers  # `submit ... --tier normal` in compose.yaml's header
    lines = (ROOT / "examples" / "jobs.jsonl").read_text().splitlines()
    assert lines and all(Job.model_validate(json.loads(line)) for line in lines)
