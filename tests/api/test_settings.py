"""ServerSettings from YAML and STAGECAST_* variables; errors name where the value came from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stagecast.api.settings import DEFAULT_SERVER_FILE, SettingsError, load_settings


def test_shipped_config_loads_with_the_documented_defaults() -> None:
    settings = load_settings(DEFAULT_SERVER_FILE, environ={})
    assert settings.cors_origins == ["*"] and settings.api_keys == []
    assert settings.ping_interval == 15 and settings.port == 8000
    assert settings.chains_dir is None  # ./chains of the working directory, then the shipped ones


def test_env_overrides_yaml_and_arguments_override_env(tmp_path: Path) -> None:
    file = tmp_path / "server.yaml"
    file.write_text("port: 9000\nping_interval: 5\napi_keys: [a]\n")
    env = {"STAGECAST_PORT": "9100", "STAGECAST_API_KEYS": "k1, k2", "STAGECAST_CORS_ORIGINS": ""}
    settings = load_settings(file, environ=env, host="0.0.0.0")
    assert settings.port == 9100 and settings.ping_interval == 5
    assert settings.api_keys == ["k1", "k2"] and settings.cors_origins == []
    assert settings.host == "0.0.0.0"
    assert load_settings(environ={"STAGECAST_SERVER_CONFIG": str(file)}).port == 9000


def test_bad_values_name_their_origin(tmp_path: Path) -> None:
    file = tmp_path / "server.yaml"
    file.write_text("port: high\nmax_body_bytes: 1\nnope: 1\n")
    with pytest.raises(SettingsError) as info:
        load_settings(file, environ={"STAGECAST_PING_INTERVAL": "0"})
    lines = str(info.value).splitlines()
    assert (
        f"{file}: port: Input should be a valid integer, unable to parse string as an integer"
        in lines
    )
    assert "STAGECAST_PING_INTERVAL: ping_interval: Input should be greater than 0" in lines
    assert f"{file}: nope: Extra inputs are not permitted" in lines
    with pytest.raises(SettingsError, match=r"missing\.yaml: no such file"):
        load_settings(tmp_path / "missing.yaml", environ={})
    file.write_text("- a list\n")
    with pytest.raises(SettingsError, match=r"expected a mapping of settings at the top"):
        load_settings(file, environ={})


def test_the_event_log_is_memory_or_a_redis_url() -> None:
    assert load_settings(DEFAULT_SERVER_FILE, environ={}).event_log == "memory"
    for url in ("redis://127.0.0.1:6379/0", "rediss://cache:6380", "unix:///run/redis.sock"):
        assert (
            load_settings(DEFAULT_SERVER_FILE, environ={"STAGECAST_EVENT_LOG": url}).event_log
            == url
        )
    with pytest.raises(SettingsError) as info:
        load_settings(DEFAULT_SERVER_FILE, environ={"STAGECAST_EVENT_LOG": "postgres://x"})
    assert str(info.value) == (
        "STAGECAST_EVENT_LOG: event_log: Value error, 'postgres://x' is not an event log: "
        "expected `memory` or a Redis URL (redis://host:6379/0, rediss://..., "
        "unix:///path/to/redis.sock)"
    )
    settings = load_settings(
        DEFAULT_SERVER_FILE,
        environ={"STAGECAST_WORK_RUNS": "false", "STAGECAST_HEARTBEAT_TIMEOUT": "2.5"},
    )
    assert settings.work_runs is False and settings.heartbeat_timeout == 2.5


@pytest.mark.parametrize(
    ("command", "blocked", "missing"),
    [
        (["worker"], ["redis"], "redis"),
        (["serve", "--port", "1"], ["hiredis"], "hiredis"),
        (["serve", "--workers", "2", "--port", "1"], ["redis", "hiredis"], "redis and hiredis"),
    ],
)
def test_a_redis_event_log_without_the_redis_extra_says_which_extra(
    tmp_path: Path, command: list[str], blocked: list[str], missing: str
) -> None:
    """A plain `pip install stagecast` has no redis-py: a Redis URL gets one line, not a
    traceback (the modules are blocked in the child as if they were not installed)."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in blocked)
    code = f"import sys; {block}; from stagecast.api.cli import main; main()"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGECAST_")}
    env["STAGECAST_EVENT_LOG"] = "redis://127.0.0.1:1/0"
    done = subprocess.run(
        [sys.executable, "-c", code, *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: STAGECAST_EVENT_LOG: event_log: Value error, a Redis event log needs the redis "
        f"extra ({missing} not installed): pip install 'stagecast[redis]'"
    )
    assert "Traceback" not in done.stderr
