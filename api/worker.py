"""``stagecast worker``: works the runs of a deployment on Redis, with no HTTP.

It reads the same settings as ``stagecast serve`` (configs/server.yaml, ``STAGECAST_*``);
``event_log`` must be a Redis URL. It takes queued runs (``api.cluster``), heartbeats, takes
over the runs of workers that died, and stops on SIGINT/SIGTERM: it takes no new run, hands
the runs going on here to the other workers (``Cluster.hand_over``: they continue each from its
log at once, with a ``stage-retry`` for what was running; with ``lost_runs: fail``, and for
replays, they are cancelled instead) and exits.

    STAGECAST_EVENT_LOG=redis://127.0.0.1:6379/0 stagecast worker
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from stagecast.api.settings import ServerSettings, SettingsError, load_settings

__all__ = ["run_worker", "work"]

SWEEP_SECONDS = 30.0


async def work(settings: ServerSettings, *, ready: asyncio.Event | None = None) -> None:
    """Work runs until cancelled (or SIGINT/SIGTERM when run by ``run_worker``)."""
    from stagecast.api.catalog import ChainCatalog
    from stagecast.api.cluster import Cluster
    from stagecast.api.metrics import Metrics
    from stagecast.api.redislog import RedisEventLog
    from stagecast.api.runs import RunManager
    from stagecast.engine.model_config import load_models_config
    from stagecast.engine.providers import ModelRegistry
    from stagecast.engine.resources import chain_dirs

    registry = ModelRegistry(load_models_config(settings.models_file))
    log = RedisEventLog(
        settings.event_log, max_events=settings.max_events_per_run, ttl=settings.finished_run_ttl
    )
    manager = RunManager(settings, log, registry, Metrics())
    catalog = ChainCatalog(settings.chains_dir if settings.chains_dir is not None else chain_dirs())
    cluster = Cluster(settings.event_log, settings, manager, catalog, work=True)
    await cluster.start()
    print(
        f"stagecast worker {cluster.worker_id}: working runs from {settings.event_log}",
        file=sys.stderr,
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        while True:
            await asyncio.sleep(min(SWEEP_SECONDS, max(settings.finished_run_ttl, 1.0)))
            manager.expire()
    finally:
        await cluster.stop_taking()
        await cluster.hand_over()  # the runs going on here continue on the other workers
        await manager.shutdown(settings.shutdown_timeout)
        await cluster.aclose()
        await log.aclose()
        await registry.aclose()


def run_worker(settings: ServerSettings | None = None) -> None:
    """The ``stagecast worker`` command: exits 2 with the reason when the settings are wrong."""
    if settings is None:
        try:
            settings = load_settings()
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    if settings.event_log == "memory":
        print(
            "error: stagecast worker needs a shared event log: set STAGECAST_EVENT_LOG "
            "(or event_log: in configs/server.yaml) to a Redis URL, e.g. redis://127.0.0.1:6379/0",
            file=sys.stderr,
        )
        raise SystemExit(2)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await work(settings)

    asyncio.run(main())
