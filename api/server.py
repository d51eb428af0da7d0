"""``stagecast serve``: the app under uvicorn.

serve()                                    # configs/server.yaml + STAGECAST_* variables
serve("0.0.0.0", 9000)                     # host/port win over the settings
"""

from __future__ import annotations

import sys
from pathlib import Path

from stagecast.api.settings import ServerSettings, SettingsError, load_settings

__all__ = ["serve"]


def serve(
    host: str | None = None,
    port: int | None = None,
    settings: ServerSettings | None = None,
    *,
    log_level: str = "info",
    recordings_dir: Path | None = None,
) -> None:
    """Run the API server until interrupted (one worker; runs live in this process)."""
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
    app = create_app(settings)
    uvicorn.run(
        app,
        host=host or settings.host,
        port=settings.port if port is None else port,
        log_level=log_level,
        # Open streams hold connections until their run ends; do not wait for them forever.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        proxy_headers=True,
    )
