"""Server settings: ``configs/server.yaml``, then ``STAGECAST_*`` environment variables on top.

Every key of the YAML file has an environment variable of the same name, upper-cased and
prefixed: ``ping_interval`` -> ``STAGECAST_PING_INTERVAL``. List values (``cors_origins``,
``api_keys``) are comma-separated in the environment. ``STAGECAST_SERVER_CONFIG`` points at
another YAML file. A bad value is reported with where it came from::

    configs/server.yaml: port: Input should be a valid integer
    STAGECAST_PING_INTERVAL: Input should be greater than 0
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stagecast.engine.resources import SHIPPED_CONFIGS, config_file
from stagecast.engine.templates import DEFAULT_LIMITS, RenderLimits

__all__ = ["DEFAULT_SERVER_FILE", "ServerSettings", "SettingsError", "load_settings"]

DEFAULT_SERVER_FILE = SHIPPED_CONFIGS / "server.yaml"
"""The shipped server.yaml; ``./configs/server.yaml`` of the working directory wins over it."""
ENV_PREFIX = "STAGECAST_"


class SettingsError(Exception):
    """A server setting is wrong; the message names the file or variable and the key."""


class ServerSettings(BaseModel):
    """What ``stagecast serve`` and ``create_app`` need to know."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    cors_origins: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Origins allowed by CORS; `*` (the default) allows every origin.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="When non-empty, /v1 and /metrics need `Authorization: Bearer <key>`, "
        "`X-API-Key: <key>` or `?api_key=<key>` (EventSource cannot send headers).",
    )
    max_body_bytes: int = Field(2_000_000, gt=0, description="Largest request body (413 above).")
    max_concurrent_runs: int = Field(
        32, gt=0, description="Runs executing at once; more get 429 with Retry-After."
    )
    ping_interval: float = Field(
        15.0, gt=0, description="Seconds between `: ping` comments on an idle stream."
    )
    viewer_send_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a write to a viewer may wait for it to read; then the viewer is "
        "dropped (it may resume with Last-Event-ID).",
    )
    retry_ms: int = Field(2000, ge=0, description="The SSE `retry:` sent when a stream opens.")
    disconnect_grace: float = Field(
        10.0,
        ge=0,
        description="Seconds an `on_disconnect: cancel` run waits, once its last viewer is gone, "
        "before it is cancelled; a viewer that comes back in time (a resume after a blip) keeps "
        "it going. 0 cancels at once.",
    )
    max_events_per_run: int = Field(
        100_000,
        gt=0,
        description="Events kept per run; the oldest are dropped beyond it "
        "(a cursor before the kept window gets 410).",
    )
    finished_run_ttl: float = Field(
        600.0, ge=0, description="Seconds a finished run (status and events) is kept."
    )
    coalesce_ms: float = Field(
        0.0, ge=0, description="Merge a stage's tokens arriving within this many ms into one event."
    )
    shutdown_timeout: float = Field(
        5.0, ge=0, description="Seconds open streams get to finish when the server stops."
    )
    max_map_items: int = Field(
        10_000, gt=0, description="Most items one map stage runs; more fail the stage."
    )
    max_input_wait: float = Field(
        3600.0,
        gt=0,
        description="Most seconds an input stage waits for its answer (whatever its own "
        "`timeout`); past it the run ends `failed` (`input_timeout`).",
    )
    waiting_runs_hold_slots: bool = Field(
        False,
        description="Whether a run waiting for input counts against `max_concurrent_runs` "
        "(by default it does not: it holds no model connection and little memory).",
    )
    max_waiting_runs: int = Field(
        10_000,
        gt=0,
        description="Runs waiting for input at once; beyond it new runs get 429 until some "
        "are answered, cancelled or time out.",
    )
    template_max_chars: int = Field(
        DEFAULT_LIMITS.max_chars,
        gt=0,
        description="Most characters (or list items) one template render produces or holds "
        "in one value; more fails the stage.",
    )
    template_max_steps: int = Field(
        DEFAULT_LIMITS.max_steps,
        gt=0,
        description="Most steps (template lines, loop turns included) one render runs.",
    )
    template_max_seconds: float = Field(
        DEFAULT_LIMITS.max_seconds, gt=0, description="Most seconds one template render runs."
    )
    chains_dir: Path | None = Field(
        None,
        description="Where chain YAML files are found; by default ./chains of the working "
        "directory, then the shipped chains.",
    )
    models_file: Path | None = Field(
        None, description="configs/models.yaml by default (the engine's built-ins if absent)."
    )
    event_log: str = Field(
        "memory",
        description="Where run events live: `memory` (this process only, the embedded default) "
        "or a Redis URL (`redis://host:6379/0`, `rediss://` for TLS, `unix:///path`): one "
        "Redis Stream per run, readable by every process of the deployment.",
    )

    work_runs: bool = Field(
        True,
        description="With a Redis event log: this serve process also works runs from the "
        "deployment's queue (false: API only, `stagecast worker` processes run them).",
    )
    heartbeat_timeout: float = Field(
        10.0,
        gt=0,
        description="With a Redis event log: seconds without a worker's heartbeat after which "
        "another worker takes its runs (a run that had started is continued, see `lost_runs`).",
    )
    lost_runs: Literal["continue", "fail"] = Field(
        "continue",
        description="With a Redis event log: what the worker that takes over a started run of a "
        "lost worker does: `continue` it from the stages that had ended (the stage that was "
        "running gets a `stage-retry` and runs again), or `fail` it (`worker_lost`). A run "
        "that cannot be continued (its first events are gone, its chain or version is not on "
        "this worker, taken over 3 times already) ends `failed` either way.",
    )

    @field_validator("event_log")
    @classmethod
    def _event_log_kind(cls, value: str) -> str:
        value = value.strip()
        if value == "memory":
            return value
        if value.startswith(("redis://", "rediss://", "unix://")):
            missing = [m for m in ("redis", "hiredis") if importlib.util.find_spec(m) is None]
            if missing:
                raise ValueError(
                    f"a Redis event log needs the redis extra ({' and '.join(missing)} not "
                    "installed): pip install 'stagecast[redis]'"
                )
            return value
        raise ValueError(
            f"{value[:60]!r} is not an event log: expected `memory` or a Redis URL "
            "(redis://host:6379/0, rediss://..., unix:///path/to/redis.sock)"
        )

    recordings_dir: Path | None = Field(
        None,
        description="A folder of recordings (*.ndjson) served by POST /v1/replays and usable as "
        '`"reuse": {"recording": NAME}`; none by default (`stagecast serve --recordings DIR`).',
    )

    def render_limits(self) -> RenderLimits:
        """The template limits every run of this server gets."""
        return RenderLimits(
            max_chars=self.template_max_chars,
            max_steps=self.template_max_steps,
            max_seconds=self.template_max_seconds,
        )


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, field in ServerSettings.model_fields.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if field.annotation == list[str]:
            values[name] = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            values[name] = raw
    return values


def _problems(exc: ValidationError, where: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(top)"
        origin = where.get(str(error["loc"][0]) if error["loc"] else "", "settings")
        lines.append(f"{origin}: {key}: {error['msg']}")
    return "\n".join(lines)


def load_settings(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ServerSettings:
    """Settings from the YAML file (``path``, ``$STAGECAST_SERVER_CONFIG`` or the default),
    then the environment, then ``overrides`` (e.g. ``--host``/``--port`` from the CLI).

    A missing default file is fine (built-in defaults); a missing file that was asked for is not.
    """
    env = os.environ if environ is None else environ
    named = path or env.get(ENV_PREFIX + "SERVER_CONFIG")
    file = Path(named) if named else config_file("server.yaml")
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    if file.exists():
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SettingsError(f"{file}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SettingsError(f"{file}: expected a mapping of settings at the top")
        data.update(loaded or {})
        where.update({key: str(file) for key in data})
    elif named:
        raise SettingsError(f"{file}: no such file")
    for key, value in _from_env(env).items():
        data[key] = value
        where[key] = ENV_PREFIX + key.upper()
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
            where[key] = f"argument {key}"
    try:
        settings = ServerSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_problems(exc, where)) from None
    base = file.parent.parent if file.parent.name == "configs" else file.parent
    if settings.chains_dir is not None and not settings.chains_dir.is_absolute():
        settings.chains_dir = base / settings.chains_dir
    if settings.models_file is not None and not settings.models_file.is_absolute():
        settings.models_file = base / settings.models_file
    if settings.recordings_dir is not None and not settings.recordings_dir.is_absolute():
        settings.recordings_dir = base / settings.recordings_dir
    return settings
