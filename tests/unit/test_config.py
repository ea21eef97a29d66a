"""Config loading: defaults, references, and errors that name the file and the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ratefleet.schemas import ConfigError, load_config

GOOD = """
[upstreams.openai]
base_url = "https://api.openai.com"

[pools.shared]
keys = [{ id = "k1", secret = "env:K1", rps = 20, burst = 5, concurrency = 4, cost_per_minute = 90000 }]

[pools.vip]
keys = [{ id = "k2", secret = "file:/run/secrets/k2", rps = 5 }]
"""


def write(tmp_path, text):
    path = tmp_path / "ratefleet.toml"
    path.write_text(text)
    return path


def test_defaults_give_four_tiers_over_every_pool_in_file_order(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert list(config.tiers) == ["vip", "premium", "normal", "guest"]
    assert [config.tiers[t].weight for t in config.tiers] == [8, 4, 2, 1]
    assert config.tier_pools("guest") == ["shared", "vip"]
    assert config.pool_upstream("vip") == "openai"
    assert config.keys()["k2"].effective_burst == 5.0  # burst defaults to one second of rps
    assert config.nats.url == "nats://127.0.0.1:4222" and config.workers.slots == 64


@pytest.mark.parametrize("text, fragment", [
    (GOOD.replace("rps = 20", "rps = 0"), "pools.shared.keys.0.rps"),
    (GOOD.replace('"https://api.openai.com"', '"ftp://x"'), "upstreams.openai.base_url"),
    (GOOD + '\n[tiers.vip]\npools = ["nope"]\n', "tiers.vip.pools: unknown pool 'nope'"),
    (GOOD.replace('id = "k2"', 'id = "k1"'), "key id 'k1' is used twice"),
    (GOOD.replace('secret = "env:K1"', 'secret = "env:"'), "env: needs a variable name"),
    (GOOD + "\n[workers]\nslots = -3\n", "workers.slots"),
    (GOOD + "\n[workers]\nsloths = 3\n", "workers.sloths"),
    (GOOD + '\n[upstreams.other]\nbase_url = "http://b"\n', "pools.shared.upstream: required"),
    ("[pools\n", "not valid TOML"),
    # Results kept 20 s under a 600 s dedup window: a re-run after they expired was dropped as
    # duplicates ("10 already queued") and `submit --wait` waited for ever
    (GOOD + "\n[streams]\nresults_max_age_s = 20\n",
     "streams: results_max_age_s (20) is shorter than duplicate_window_s (600)"),
])
def test_bad_config_is_refused_naming_file_and_field(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and fragment in str(caught.value)


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_env_overrides_and_literal_secret_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("RATEFLEET_NATS_URL", "nats://10.1.2.3:4333")
    with pytest.warns(UserWarning, match="literal secret"):
        config = load_config(write(tmp_path, GOOD.replace('"env:K1"', '"sk-literal-123456"')))
    assert config.nats.url == "nats://10.1.2.3:4333"
    assert "sk-literal-123456" not in repr(config)


def test_cli_refuses_bad_config_with_the_field_and_exit_2(tmp_path):
    path = write(tmp_path, GOOD.replace("rps = 20", 'rps = "fast"'))
    proc = subprocess.run([sys.executable, "-m", "ratefleet", "dispatcher", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pools.shared.keys.0.rps" in proc.stderr and str(path) in proc.stderr


@pytest.mark.parametrize("timing", ["[workers]\nheartbeat_s = 3\n",
                                    "[workers]\nheartbeat_s = 5\n\n[dispatcher]\nworker_timeout_s = 4\n"])
def test_a_heartbeat_no_more_often_than_the_worker_timeout_is_refused(tmp_path, timing):
    # heartbeat_s 3 beside the default worker_timeout_s 3: every beat came a little more than 3 s
    # after the last, so the leader gave the worker up before each one and the worker, seeing a
    # silence past worker_timeout_s at every beat, dropped 271 of 300 assignments read over 10 beats
    # (every one after the first beat): the fleet called nothing
    path = write(tmp_path, GOOD + "\n" + timing)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "workers.heartbeat_s" in str(caught.value) and "dispatcher.worker_timeout_s" in str(caught.value)


def test_a_heartbeat_well_inside_the_worker_timeout_is_taken(tmp_path):
    config = load_config(write(tmp_path, GOOD + "\n[workers]\nheartbeat_s = 2.5\n"))
    assert config.workers.heartbeat_s == 2.5


def test_a_bad_nats_url_shows_its_address_never_its_credentials_and_names_the_flag(tmp_path):
    """A new user's finding: `--nats nats://127.0.0.1:99999` was reported as "nats://127.0.0.1...
    is not a NATS server URL", blamed on the config file: the port, the one wrong part, was cut."""
    from ratefleet.schemas.config import ConfigError, load_config, nats_url_problem

    problem = nats_url_problem("nats://127.0.0.1:99999")
    assert "nats://127.0.0.1:99999" in problem and "port must be a number from 1 to 65535" in problem
    hidden = nats_url_problem("nats://alice:s3cretpw@db.internal:99x")
    assert "nats://db.internal:99x" in hidden and "s3cretpw" not in hidden and "alice" not in hidden
    assert "port" not in nats_url_problem("http://h:4222")  # the scheme is what is wrong there
    # a reviewer's finding: a password holding "/" ended netloc early, and part of it was shown
    cut = nats_url_problem("nats://admin:s3cr/et@host:4222")
    assert "s3cr" not in cut and "admin" not in cut and "nats://host:4222" in cut and "percent-encoded" in cut
    assert "port must be" in nats_url_problem("nats://u:pw@host:99999")
    config = tmp_path / "ratefleet.toml"
    config.write_text('[nats]\nurl = "nats://127.0.0.1:4222"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config, nats_url="nats://127.0.0.1:99999")
    assert "with --nats or $RATEFLEET_NATS_URL" in str(caught.value)


def test_a_nats_url_with_no_host_in_it_is_refused_and_the_env_variable_is_named_once(tmp_path, monkeypatch):
    """A trial: `--nats "not a url"` was taken (then "nothing answers at not a url", exit 1), and
    with $RATEFLEET_NATS_URL set the error named its source twice: "(with RATEFLEET_NATS_URL,
    --nats or $RATEFLEET_NATS_URL)"."""
    from ratefleet.schemas.config import ConfigError, load_config, nats_url_problem

    assert "its host is no host name or address" in nats_url_problem("not a url")
    assert "its host is no host name or address" in nats_url_problem("nats://bad host:4222")
    for good in ("127.0.0.1:4222", "nats://[::1]:4222", "nats://u:p%40ss@nats-1.internal:4222", "tls://h_1:1",
                 "nats://bücher.example:4222"):  # (an IDNA host too: a review's finding)
        assert nats_url_problem(good) is None, good
    from ratefleet.schemas import UpstreamConfig
    assert UpstreamConfig(base_url="https://api.bücher.example").base_url  # upstreams are not held to it
    monkeypatch.setenv("RATEFLEET_NATS_URL", "http://x:1")  # typer passes it on as --nats as well
    with pytest.raises(ConfigError) as caught:
        load_config(None, nats_url="http://x:1")
    assert "(with --nats or $RATEFLEET_NATS_URL)" in str(caught.value) and "RATEFLEET_NATS_URL," not in str(caught.value)


CALLERS = GOOD + """
[tiers.vip]
[tiers.bulk]

[callers.app]
key = "env:RF_APP"
tier = "vip"

[callers.night]
key = "env:RF_NIGHT"
tier = "bulk"

[callers.own]
key = "env:RF_OWN"
tier = "vip"
batch_tier = "vip"
"""


def test_batch_api_lines_run_on_the_lowest_tier_unless_a_caller_names_one(tmp_path):
    """A new user's finding: a caller's Batch API lines shared its online requests' tier and held
    them back. Default: the config's lowest (last) tier; `callers.<name>.batch_tier` sets another."""
    config = load_config(write(tmp_path, CALLERS))
    assert [config.batch_tier(name) for name in ("app", "night", "own")] == ["bulk", "bulk", "vip"]


def test_an_unknown_batch_tier_is_refused_naming_the_caller(tmp_path):
    with pytest.raises(ConfigError, match=r"callers\.own\.batch_tier: unknown tier 'nope'; known: \['vip', 'bulk'\]"):
        load_config(write(tmp_path, CALLERS.replace('batch_tier = "vip"', 'batch_tier = "nope"')))


def test_config_check_notes_callers_whose_batches_share_their_own_tier(tmp_path):
    from typer.testing import CliRunner

    from ratefleet.cli import app
    done = CliRunner().invoke(app, ["config", "check", str(write(tmp_path, CALLERS))])
    assert done.exit_code == 0, done.output
    notes = [line for line in done.output.splitlines() if "Batch API" in line]
    assert [note.split("'")[0] for note in notes] == ["note: callers.night", "note: callers.own"]
    assert "set callers.night.batch_tier to a lower tier" in notes[0]


def test_config_check_warns_of_shared_secrets_several_upstreams_and_settings_not_live(tmp_path):
    """An operator's trial: two key ids with one secret ran one provider key at twice its rate
    (13 x 429 in 400 jobs) without a word; `push` said "applied" for [workers] and
    dispatcher.lease_ttl_s, which no process applies live; a new user's: a push adding a second
    upstream broke every producer naming none, with only a note about callers."""
    from typer.testing import CliRunner

    from ratefleet.cli import app
    text = GOOD.replace('secret = "file:/run/secrets/k2"', 'secret = "env:K1"') + """
[upstreams.other]
base_url = "https://other.example.test"

[workers]
slots = 16

[dispatcher]
policy = "strict"
lease_ttl_s = 6
"""
    text = text.replace("[pools.shared]", '[pools.shared]\nupstream = "openai"').replace(
        "[pools.vip]", '[pools.vip]\nupstream = "openai"')
    done = CliRunner().invoke(app, ["config", "check", str(write(tmp_path, text))])
    assert done.exit_code == 0, done.output
    assert "warning: keys k1, k2 have the same secret (env:K1)" in done.output
    assert "note: 2 upstreams and none is the default: a job that names no `upstream` is refused" in done.output
    assert "note: [workers], dispatcher.lease_ttl_s are not applied live" in done.output
    plain = CliRunner().invoke(app, ["config", "check", str(write(tmp_path, GOOD))])
    assert "same secret" not in plain.output and "not applied live" not in plain.output


@pytest.mark.parametrize("field, value, message", [
    ("concurrency", "true", "concurrency: Input should be a valid integer"),
    ("rps", '"10"', "rps: Input should be a valid number"),
    ("burst", "false", "burst: Input should be a valid number"),
])
def test_a_keys_limits_must_be_numbers(tmp_path, field, value, message):
    """An operator's trial: `concurrency = true` was taken as 1 and `rps = "10"` as 10."""
    text = GOOD.replace("rps = 5 }", f"rps = 5, {field} = {value} }}" if field != "rps" else f"rps = {value} }}")
    with pytest.raises(ConfigError, match=f"pools.vip.keys.0.{message}"):
        load_config(write(tmp_path, text))


def test_the_default_batch_tier_is_the_lowest_whose_pools_call_the_callers_upstreams(tmp_path):
    """A reviewer's finding on the first version: the lowest tier's pools served another upstream,
    and every line of a caller's batch ended no_key_available."""
    from typer.testing import CliRunner

    from ratefleet.cli import app
    text = """
[upstreams.mock]
base_url = "http://127.0.0.1:1"
[upstreams.other]
base_url = "http://127.0.0.1:2"
[pools.shared]
upstream = "mock"
keys = [{ id = "k1", secret = "env:K1", rps = 5 }]
[pools.cheap]
upstream = "other"
keys = [{ id = "k2", secret = "env:K2", rps = 5 }]
[tiers.vip]
pools = ["shared"]
[tiers.normal]
pools = ["shared", "cheap"]
[tiers.guest]
pools = ["cheap"]
[callers.alice]
key = "env:RF_ALICE"
tier = "vip"
upstreams = ["mock"]
[callers.bob]
key = "env:RF_BOB"
tier = "vip"
upstreams = ["mock"]
batch_tier = "guest"
[callers.carol]
key = "env:RF_CAROL"
tier = "normal"
upstreams = ["other"]
"""
    config = load_config(write(tmp_path, text))
    assert config.batch_tier("alice") == "normal"  # guest has no pool for mock
    assert config.batch_tier("carol") == "guest"
    assert config.unserved("guest", "bob") == ["mock"]
    done = CliRunner().invoke(app, ["config", "check", str(tmp_path / "ratefleet.toml")])
    assert "warning: callers.bob's Batch API batches run on tier 'guest', which has no pool for mock" in done.output
    assert "callers.alice's Batch API batches run on tier" not in done.output


def test_config_check_notes_a_literal_nats_secret(tmp_path):
    """An operations trial: `config check` said only "valid" of `[nats] password = "S3CRETPASS2"`,
    which every role then warned of; the note names the field, never the value."""
    from typer.testing import CliRunner

    from ratefleet.cli import app
    text = '[nats]\nurl = "nats://127.0.0.1:4222"\nuser = "fleet"\npassword = "S3CRETPASS2"\n\n' + GOOD
    done = CliRunner().invoke(app, ["config", "check", str(write(tmp_path, text))])
    assert done.exit_code == 0, done.output
    assert "note: literal secret at nats.password" in done.output and "S3CRETPASS2" not in done.output
    plain = CliRunner().invoke(app, ["config", "check", str(write(tmp_path, GOOD))])
    assert "nats." not in plain.output
