"""``stagecast serve``: the app under uvicorn.

serve()                                    # configs/server.yaml + STAGECAST_* variables
serve("0.0.0.0", 9000)                     # host/port win over the settings
serve(workers=4)                           # 4 processes: needs event_log: redis://...

``app_factory`` is the app for ``uvicorn --factory stagecast.api.server:app_factory`` (what
``--workers N`` starts in each process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from stagecast.api.settings import ServerSettings, SettingsError, load_settings

__all__ = ["app_factory", "serve"]


def app_factory() -> Any:
    """The app from configs/server.yaml and the environment (one per uvicorn worker process)."""
    from stagecast.api.app import create_app

    return create_app(load_settings())


def serve(
    host: str | None = None,
    port: int | None = None,
    settings: ServerSettings | None = None,
    *,
    log_level: str = "info",
    workers: int = 1,
    recordings_dir: Path | None = None,
) -> None:
    """Run the API server until interrupted. With ``workers`` > 1, that many processes share
    the deployment's Redis (``event_log``); with the in-memory log that is refused (exit 2)."""
    import uvicorn

    from stagecast.api.app import create_app

    if settings is None:
        try:
            settings = load_settings()
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    if recordings_dir is not None:
        settings = settings.model_copy(update={"recordings_dir": recordings_dir.resolve()})
        # the worker processes of --workers N build their app from the environment
        os.environ["STAGECAST_RECORDINGS_DIR"] = str(recordings_dir.resolve())
    if workers > 1 and settings.event_log == "memory":
        print(
            f"error: --workers {workers} needs a shared event log: set STAGECAST_EVENT_LOG (or "
            "event_log: in configs/server.yaml) to a Redis URL, e.g. redis://127.0.0.1:6379/0",
            file=sys.stderr,
        )
        raise SystemExit(2)
    target: Any = create_app(settings) if workers == 1 else "stagecast.api.server:app_factory"
    uvicorn.run(
        target,
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=host or settings.host,
        port=settings.port if port is None else port,
        log_level=log_level,
        # Open streams hold connections until their run ends; do not wait for them forever.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        proxy_headers=True,
        # a worker process imports the whole stack before it answers the supervisor's pings
        timeout_worker_healthcheck=60,
    )
