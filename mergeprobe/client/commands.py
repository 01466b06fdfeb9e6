"""`mergeprobe models …` and `mergeprobe jobs …`: the service's API from a terminal or a script.

Output is for people by default and JSON with `--json`; progress and errors go to stderr. What
the service says (names, metadata, warnings, problems) is shown to people with its control
characters escaped. Exit status: 0 success, 1 an HTTP error, an unreachable service, a job that
failed or was canceled, or a local file that could not be written; 2 a usage error (arguments, the
service URL, an unreadable or invalid recipe or upload, a download directory that is a file),
130 interrupted.
The service's URL and API key come from `mergeprobe.cli` (options, then the environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mergeprobe.client.http import ApiClient, ApiError, ClientError, ExistsError, UrlError
from mergeprobe.client.output import (
    FINAL_STATUSES,
    JobProgress,
    dump_json,
    human_size,
    job_duration,
    one_line,
    printable,
    problem_lines,
    table,
    transfer_progress,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EVENT_RETRIES = 5
# Answers from a proxy or a service that is restarting or busy: followed again like a broken stream.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


class UsageError(Exception):
    """Bad arguments or an unusable recipe: exit status 2."""


class Context:
    def __init__(self, args: argparse.Namespace, client: ApiClient) -> None:
        self.args = args
        self.client = client
        self.json = bool(getattr(args, "json", False))

    @property
    def out(self):
        return sys.stdout

    @property
    def err(self):
        return sys.stderr

    def say(self, text: str = "") -> None:
        self.out.write(printable(text) + "\n")

    def note(self, text: str) -> None:
        self.err.write(printable(text) + "\n")
        self.err.flush()


# -- recipes ------------------------------------------------------------------------------------


def load_recipe(source: str) -> dict[str, Any]:
    """A job's request body from a JSON or YAML file, or stdin (`-`)."""
    if source == "-":
        name, suffix, text = "<stdin>", "", sys.stdin.read()
    else:
        path = Path(source)
        name, suffix = source, path.suffix.lower()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"{source}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{source}: cannot read it: {exc}") from None
    if suffix in (".yaml", ".yml"):
        doc = _yaml(text, name)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            where = f"line {exc.lineno} column {exc.colno}"
            if suffix == ".json":
                raise UsageError(f"{name}: not valid JSON: {exc.msg} at {where}") from None
            try:
                doc = _yaml(text, name)
            except UsageError as yaml_error:
                raise UsageError(f"{name}: not valid JSON ({exc.msg} at {where}); {yaml_error}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{name}: a recipe is an object of request fields, not a {type(doc).__name__}")
    try:
        json.dumps(doc)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name}: holds a value JSON cannot carry: {exc}") from None
    return doc


def _yaml(text: str, name: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise UsageError(
            "YAML recipes need PyYAML, which is not installed here (pip install pyyaml); "
            "or write the recipe as JSON"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"not valid YAML: {problem}{where}") from None


# -- models -------------------------------------------------------------------------------------


def models_list(ctx: Context) -> int:
    models = ctx.client.get("/v1/models")["models"]
    if ctx.json:
        dump_json(models, ctx.out)
        return EXIT_OK
    if not models:
        ctx.say("no models")
        return EXIT_OK
    rows = [
        [
            m["id"],
            m.get("arch", "?"),
            m.get("kind", "?"),
            human_size(m.get("size_bytes")),
            m.get("short_hash", ""),
            m["name"],
        ]
        for m in models
    ]
    ctx.say(table(rows, ["ID", "ARCH", "KIND", "SIZE", "HASH", "NAME"]))
    return EXIT_OK


def _model_lines(ctx: Context, model: dict[str, Any]) -> list[str]:
    m = {k: one_line(v) for k, v in model.items() if isinstance(v, str | int | float) or v is None}
    variant = model.get("variant") or {}
    dtypes = ", ".join(f"{one_line(k)} {one_line(v)}" for k, v in (model.get("dtypes") or {}).items())
    lines = [
        f"id:          {m['id']}",
        f"name:        {m['name']}",
        f"kind:        {m.get('kind', '?')}",
        f"arch:        {m.get('arch', '?')}"
        + (f" ({one_line(variant['title'])})" if variant.get("title") else ""),
        f"format:      {m.get('format', '?')}",
        f"size:        {human_size(model.get('size_bytes'))} ({m.get('size_bytes')} bytes)",
        f"sha256:      {m.get('sha256')}",
        f"short hash:  {m.get('short_hash')}",
        f"keys:        {m.get('key_count')}" + (f" ({dtypes})" if dtypes else ""),
    ]
    lora = model.get("lora")
    if lora:
        formats = ", ".join(one_line(f) for f in lora.get("formats") or [])
        lines.append(
            f"lora:        {formats}, {one_line(lora.get('module_count'))} modules, "
            f"ranks {one_line(lora.get('ranks'))}"
        )
    metadata = model.get("metadata") or {}
    if metadata:
        entries = f"{len(metadata)} entr{'y' if len(metadata) == 1 else 'ies'}"
        lines.append(f"metadata:    {entries}: {', '.join(one_line(k) for k in sorted(metadata))}")
    if model.get("download_url"):
        lines.append(f"download:    {one_line(ctx.client.url_of(model['download_url']))}")
    return lines


def models_show(ctx: Context) -> int:
    model = ctx.client.get(f"/v1/models/{_segment(ctx.args.id)}")
    if ctx.json:
        dump_json(model, ctx.out)
    else:
        ctx.say("\n".join(_model_lines(ctx, model)))
    return EXIT_OK


def models_upload(ctx: Context) -> int:
    path = Path(ctx.args.file)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    name = ctx.args.name or path.name
    progress = None if ctx.json else transfer_progress(ctx.err, f"uploading {name}")
    model = ctx.client.upload("/v1/models", path, params={"name": name}, progress=progress)
    if ctx.json:
        dump_json(model, ctx.out)
    else:
        ctx.say(
            f"uploaded {one_line(model['name'])} as {one_line(model['id'])} "
            f"({human_size(model.get('size_bytes'))}, sha256 {one_line(model.get('sha256'))})"
        )
    return EXIT_OK


def _output_path(target: str | None, name: str) -> Path:
    """`-o PATH`: a file, or a directory (an existing one, or a path ending in /) to put `name` in."""
    if not target:
        return Path(_safe_name(name))
    path = Path(target)
    if target.endswith(("/", "\\")) or path.is_dir():
        return path / _safe_name(name)
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory")
    return path


def models_download(ctx: Context) -> int:
    model = ctx.client.get(f"/v1/models/{_segment(ctx.args.id)}")
    url = model.get("download_url") or f"/v1/models/{_segment(model['id'])}/file"
    if ctx.args.output == "-":
        size, sha256 = ctx.client.download(
            url, None, expected_sha256=model.get("sha256"), stdout=sys.stdout.buffer
        )
        sys.stdout.buffer.flush()
        return EXIT_OK
    dest = _output_path(ctx.args.output, model["name"])
    progress = None if ctx.json else transfer_progress(ctx.err, f"downloading {model['name']}")
    size, sha256 = ctx.client.download(
        url, dest, expected_sha256=model.get("sha256"), force=ctx.args.force, progress=progress
    )
    if ctx.json:
        dump_json({"id": model["id"], "path": str(dest), "size_bytes": size, "sha256": sha256}, ctx.out)
    else:
        ctx.say(f"{one_line(dest)} ({human_size(size)}, sha256 {sha256})")
    return EXIT_OK


def models_rm(ctx: Context) -> int:
    ctx.client.request_json("DELETE", f"/v1/models/{_segment(ctx.args.id)}")
    if ctx.json:
        dump_json({"deleted": ctx.args.id}, ctx.out)
    else:
        ctx.say(f"deleted {one_line(ctx.args.id)}")
    return EXIT_OK


# -- jobs ---------------------------------------------------------------------------------------


def _compact(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _progress_text(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    if job.get("status") != "running":
        return "-"
    done, total = progress.get("completed", 0), progress.get("total", 0)
    count = f"{done}/{total} " if total else ""
    return f"{count}{progress.get('stage', '')}".strip() or "-"


def _status_text(job: dict[str, Any]) -> str:
    took = job_duration(job)
    return job["status"] + (
        f" in {took:.1f} s" if took is not None and job["status"] in FINAL_STATUSES else ""
    )


def _named_models(value: Any) -> str | None:
    """A job's pinned input as a name: {name, sha256}, or a list of them."""
    if isinstance(value, dict) and "name" in value and "sha256" in value:
        return str(value["name"])
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return ", ".join(str(v["name"]) for v in value)
    return None


def _result_lines(ctx: Context, job: dict[str, Any]) -> list[str]:
    lines = []
    result = job.get("result") or {}
    model = result.get("model")
    writes_model = isinstance(model, dict) and bool(model.get("download_url"))
    if writes_model:
        lines.append(f"model:      {one_line(model.get('name'))}  sha256 {one_line(model.get('sha256'))}")
        lines.append(f"            {one_line(ctx.client.url_of(model['download_url']))}")
    rest = [(k, v) for k, v in result.items() if not (k == "model" and writes_model)]
    if rest:
        lines.append("result:")
    for key, value in rest:
        shown = value if isinstance(value, str | int | float | bool) or value is None else _compact(value)
        lines.append(f"  {one_line(key)}: {one_line(shown)}")
    artifacts = job.get("artifacts") or []
    if artifacts:
        lines.append("artifacts:")
        rows = [[a["name"], human_size(a.get("size_bytes")), a.get("media_type", "")] for a in artifacts]
        lines += ["  " + line for line in table(rows, ["NAME", "SIZE", "TYPE"]).splitlines()]
    return lines


def _job_lines(ctx: Context, job: dict[str, Any]) -> list[str]:
    lines = [
        f"id:         {one_line(job['id'])}",
        f"kind:       {one_line(job['kind'])}",
        f"status:     {one_line(_status_text(job))}"
        + (" (cancel requested)" if job.get("cancel_requested") else ""),
    ]
    if job.get("status") == "running":
        lines.append(f"progress:   {one_line(_progress_text(job))}")
    lines.append(f"created:    {one_line(job.get('created_at'))}")
    for key in ("started_at", "finished_at"):
        if job.get(key):
            lines.append(f"{key.split('_')[0] + ':':<11} {one_line(job[key])}")
    if job.get("worker"):
        lines.append(f"worker:     {one_line(job['worker'])}")
    inputs = [(k, _named_models(v)) for k, v in (job.get("inputs") or {}).items()]
    inputs = [(k, v) for k, v in inputs if v]
    if inputs:
        lines.append("inputs:     " + ", ".join(f"{one_line(k)} {one_line(v)}" for k, v in inputs))
    lines += _result_lines(ctx, job)
    if job.get("error"):
        lines.append("error:")
        lines += ["  " + line for line in problem_lines(job["error"], job.get("request"))]
    for warning in job.get("warnings") or []:
        lines.append(f"warning:    {one_line(warning)}")
    return lines


def jobs_list(ctx: Context) -> int:
    args = ctx.args
    page = ctx.client.get(
        "/v1/jobs", kind=args.kind, status=args.status, limit=args.limit, cursor=args.cursor
    )
    if ctx.json:
        dump_json(page, ctx.out)
        return EXIT_OK
    jobs = page.get("jobs") or []
    if not jobs:
        ctx.say("no jobs")
    else:
        rows = [
            [j["id"], j["kind"], _status_text(j), _progress_text(j), j.get("created_at", "")] for j in jobs
        ]
        ctx.say(table(rows, ["ID", "KIND", "STATUS", "PROGRESS", "CREATED"]))
    if page.get("next_cursor"):
        ctx.note(f"more: --cursor {one_line(page['next_cursor'])}")
    return EXIT_OK


def jobs_show(ctx: Context) -> int:
    job = ctx.client.get(f"/v1/jobs/{_segment(ctx.args.id)}")
    if ctx.json:
        dump_json(job, ctx.out)
    else:
        ctx.say("\n".join(_job_lines(ctx, job)))
    return EXIT_OK


def jobs_cancel(ctx: Context) -> int:
    job = ctx.client.request_json("DELETE", f"/v1/jobs/{_segment(ctx.args.id)}")
    if ctx.json:
        dump_json(job, ctx.out)
    elif job["status"] == "canceled":
        ctx.say(f"{one_line(job['id'])} canceled")
    elif job.get("cancel_requested") and job["status"] not in FINAL_STATUSES:
        job_id = one_line(job["id"])
        ctx.say(f"{job_id} cancel requested; it stops within about a second (mergeprobe jobs watch {job_id})")
    else:
        ctx.say(f"{one_line(job['id'])} already {one_line(job['status'])}")
    return EXIT_OK


def follow(client: ApiClient, job_id: str, on_job) -> dict[str, Any]:
    """Follow a job's events until it ends; return its final state. A stream that breaks off (the
    service restarting, a proxy's idle timeout), or an answer 429, 502, 503 or 504 (a proxy before a
    service that is restarting, a busy service), is tried again with a growing pause, a few times
    in a row at most."""
    path = f"/v1/jobs/{_segment(job_id)}"
    job: dict[str, Any] | None = None
    failures = 0
    while True:
        try:
            with contextlib.closing(client.events(f"{path}/events")) as events:
                for event, data in events:
                    if event == "job":
                        try:
                            job = json.loads(data)
                        except ValueError:
                            raise ClientError(f"{path}/events: an event that is not JSON") from None
                        failures = 0
                        on_job(job)
                    elif event == "end":
                        break
            if job is not None and job.get("status") in FINAL_STATUSES:
                return job
            # The stream ended before the job did: ask for it, then follow it again.
            job = client.get(path)
            on_job(job)
            if job.get("status") in FINAL_STATUSES:
                return job
            _pause(0.5)
        except ApiError as exc:
            if exc.status not in RETRY_STATUSES:
                raise
            failures += 1
            if failures > EVENT_RETRIES:
                raise
            _pause(_backoff(failures))
        except ClientError:
            failures += 1
            if failures > EVENT_RETRIES:
                raise
            _pause(_backoff(failures))


def _backoff(failures: int) -> float:
    """Seconds before following a job again after `failures` failures in a row: 1, 2, 4, then 5."""
    return min(0.5 * 2**failures, 5.0)


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def _watch(ctx: Context, job_id: str, *, ndjson: bool = False) -> dict[str, Any] | None:
    """Follow a job with a progress display on stderr; None when interrupted."""
    quiet = getattr(ctx.args, "quiet", False)
    show = not quiet and (not ctx.json or ctx.err.isatty())
    display = JobProgress(ctx.err, ctx.err.isatty(), label=f"{job_id} ")

    def on_job(job: dict[str, Any]) -> None:
        if ndjson:
            ctx.out.write(json.dumps(job) + "\n")
            ctx.out.flush()
        if show:
            display.update(job)

    try:
        job = follow(ctx.client, job_id, on_job)
    except KeyboardInterrupt:
        display.interrupt()
        ctx.note(f"interrupted; job {job_id} goes on (mergeprobe jobs cancel {job_id} stops it)")
        return None
    if show:
        display.finish(job)
    return job


def _report_end(
    ctx: Context,
    job: dict[str, Any],
    downloaded: list[dict[str, Any]] | None = None,
    *,
    print_job: bool = True,
) -> int:
    """After a job ended: its result (or problem) and the exit status."""
    if not print_job:
        pass
    elif ctx.json:
        dump_json({**job, "downloaded": downloaded} if downloaded is not None else job, ctx.out)
    elif job["status"] == "succeeded":
        lines = _result_lines(ctx, job)
        if lines:
            ctx.say("\n".join(lines))
        _say_downloaded(ctx, downloaded or [])
    if job["status"] == "succeeded":
        return EXIT_OK
    if job.get("error"):
        lines = problem_lines(job["error"], job.get("request"))
        ctx.note(f"mergeprobe: job {one_line(job['id'])} {one_line(job['status'])}: " + lines[0])
        for line in lines[1:]:
            ctx.note(line)
    else:
        ctx.note(f"mergeprobe: job {one_line(job['id'])} {one_line(job['status'])}")
    return EXIT_FAILED


def _say_downloaded(ctx: Context, downloaded: list[dict[str, Any]]) -> None:
    for item in downloaded:
        ctx.say(f"downloaded {one_line(item['path'])} ({human_size(item['size_bytes'])})")


def _download_dir(value: str) -> Path:
    """`--download DIR`, `jobs download ID DIR`: a directory, or where one will be made."""
    directory = Path(value)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    return directory


def download_results(ctx: Context, job: dict[str, Any], directory: Path, force: bool) -> list[dict[str, Any]]:
    """A finished job's artifacts and, for a job that wrote a model, the model, into `directory`.
    Every destination is checked first (a plain name, no two alike, none that exists unless
    `force`, none a directory): a refusal leaves nothing half downloaded."""
    wanted = [(a["url"], a["name"], a.get("sha256")) for a in job.get("artifacts") or []]
    model = (job.get("result") or {}).get("model")
    if isinstance(model, dict) and model.get("download_url"):
        wanted.append((model["download_url"], model["name"], model.get("sha256")))
    plan: list[tuple[str, str, str | None, Path]] = []
    seen: set[str] = set()
    for url, name, sha256 in wanted:
        dest = directory / _safe_name(name)
        if name in seen:
            raise ClientError(f"job {one_line(job['id'])} has two files named {name!r}; nothing downloaded")
        seen.add(name)
        plan.append((url, name, sha256, dest))
    dirs = [dest for *_, dest in plan if dest.is_dir()]
    if dirs:
        raise ExistsError(f"{dirs[0]} is a directory; nothing downloaded")
    existing = [dest for *_, dest in plan if dest.exists()]
    if existing and not force:
        names = ", ".join(str(d) for d in existing)
        raise ExistsError(
            f"{names} exist{'s' if len(existing) == 1 else ''}; nothing downloaded (--force replaces)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    for url, name, sha256, dest in plan:
        progress = None if ctx.json else transfer_progress(ctx.err, f"downloading {name}")
        size, digest = ctx.client.download(url, dest, expected_sha256=sha256, force=force, progress=progress)
        done.append({"name": name, "path": str(dest), "size_bytes": size, "sha256": digest})
    return done


def jobs_submit(ctx: Context) -> int:
    args = ctx.args
    body = load_recipe(args.recipe)
    directory = _download_dir(args.download) if args.download is not None else None
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    try:
        job = ctx.client.request_json(
            "POST", f"/v1/jobs/{_segment(args.kind)}", json_body=body, headers=headers
        )
    except ApiError as exc:
        exc.request = body  # shown with the problem: a caret under the position in a spec string
        raise
    wait = args.wait or directory is not None
    if not wait:
        if ctx.json:
            dump_json(job, ctx.out)
        else:
            ctx.say(f"{one_line(job['id'])}  {one_line(job['kind'])}  {one_line(job['status'])}")
        return EXIT_OK
    if not ctx.json and not getattr(args, "quiet", False):
        ctx.note(f"{one_line(job['id'])}  {one_line(job['kind'])}  submitted")
    final = _watch(ctx, job["id"])
    if final is None:
        return EXIT_INTERRUPTED
    downloaded = None
    if directory is not None and final["status"] == "succeeded":
        downloaded = download_results(ctx, final, directory, args.force)
    return _report_end(ctx, final, downloaded)


def jobs_download(ctx: Context) -> int:
    """A finished job's artifacts and the model it wrote, as `jobs submit --download` gets them."""
    directory = _download_dir(ctx.args.dir)
    job = ctx.client.get(f"/v1/jobs/{_segment(ctx.args.id)}")
    job_id, status = one_line(job["id"]), job["status"]
    if status not in FINAL_STATUSES:
        raise ClientError(
            f"job {job_id} is {one_line(status)}: nothing to download until it succeeds "
            f"(mergeprobe jobs watch {job_id} follows it)"
        )
    if status != "succeeded":
        raise ClientError(
            f"job {job_id} {one_line(status)}: it has no results (mergeprobe jobs show {job_id})"
        )
    downloaded = download_results(ctx, job, directory, ctx.args.force)
    if ctx.json:
        dump_json({"id": job["id"], "downloaded": downloaded}, ctx.out)
    elif downloaded:
        _say_downloaded(ctx, downloaded)
    else:
        ctx.note(f"job {job_id} has no artifacts and wrote no model: nothing to download")
    return EXIT_OK


def jobs_watch(ctx: Context) -> int:
    final = _watch(ctx, ctx.args.id, ndjson=ctx.json)
    if final is None:
        return EXIT_INTERRUPTED
    # With --json the states went out as JSON lines already, the final one last.
    return _report_end(ctx, final, print_job=not ctx.json)


# -- plumbing -----------------------------------------------------------------------------------


def _segment(value: str) -> str:
    """An id as one path segment."""
    return quote(value, safe="")


def _safe_name(name: str) -> str:
    """A file name the service gave, as a plain name in the target directory (never a path)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ClientError(f"the service named a file {name!r}: not a plain file name")
    return name


def run(args: argparse.Namespace, url: str, api_key: str | None) -> int:
    """Run a client command; errors become a message on stderr and an exit status."""
    as_json = bool(getattr(args, "json", False))

    def error(text: str) -> None:
        sys.stderr.write(printable(text) + "\n")

    try:
        ctx = Context(args, ApiClient(url, api_key))
        return args.client_func(ctx)
    except (UsageError, UrlError) as exc:
        error(f"mergeprobe: {one_line(exc)}")
        return EXIT_USAGE
    except ApiError as exc:
        lines = problem_lines({"status": exc.status, **exc.problem}, exc.request)
        error(f"mergeprobe: {exc.method} {one_line(exc.url)}: {lines[0]}")
        for line in lines[1:]:
            error(line)
        if as_json:
            dump_json(exc.problem, sys.stdout)
        return EXIT_FAILED
    except ClientError as exc:
        error(f"mergeprobe: {one_line(exc)}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("\nmergeprobe: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `mergeprobe … | head`: the reader went away. Nothing more to say, and nothing for the
        # interpreter to flush into the closed pipe on its way out.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        # Here, not the network (http.py makes that a ClientError): a file or directory that could
        # not be read, made or written (-o into a directory that cannot exist, a full disk).
        error(f"mergeprobe: {one_line(_os_error_text(exc))}")
        return EXIT_FAILED


def _os_error_text(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None and exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {reason}"
    if exc.filename is not None:
        return f"{exc.filename}: {reason}"
    return reason


# -- parsers ------------------------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    # SUPPRESS: given before or after the subcommand (`mergeprobe jobs --json list`,
    # `mergeprobe jobs list --json`), a value is kept, and an absent one overwrites nothing.
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("service")
    group.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="the service (default $MERGEPROBE_URL, else http://127.0.0.1:8000)",
    )
    group.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="bearer token (default $MERGEPROBE_API_KEY)"
    )
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    return common


def add_client_parsers(sub: argparse._SubParsersAction, func) -> None:
    """`models` and `jobs` under the top-level parser; `func(args)` runs the chosen one."""
    common = _common_options()

    def leaf(parent, name: str, handler, help_text: str, **kwargs) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, parents=[common], help=help_text, description=help_text, **kwargs)
        parser.set_defaults(func=func, client_func=handler, is_client=True)
        return parser

    models = sub.add_parser(
        "models", parents=[common], help="the model library (list, show, upload, download, rm)"
    )
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    leaf(models_sub, "list", models_list, "models in the library")
    show = leaf(models_sub, "show", models_show, "one model: architecture, size, hashes, metadata")
    show.add_argument("id", help="name, id, sha256 or short hash")
    upload = leaf(
        models_sub, "upload", models_upload, "add a .safetensors or .ckpt file to the library (streamed)"
    )
    upload.add_argument("file")
    upload.add_argument("--name", help="its name in the library (default: the file's name)")
    download = leaf(
        models_sub, "download", models_download, "download a model's file (streamed, sha256 checked)"
    )
    download.add_argument("id", help="name, id, sha256 or short hash")
    download.add_argument(
        "-o", "--output", help="file or directory to write (default: its name here; - for stdout)"
    )
    download.add_argument("--force", action="store_true", help="replace an existing file")
    rm = leaf(models_sub, "rm", models_rm, "delete a model (refused while a job uses it)")
    rm.add_argument("id", help="name, id, sha256 or short hash")

    jobs = sub.add_parser("jobs", parents=[common], help="jobs (submit, list, show, watch, cancel, download)")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    submit = leaf(
        jobs_sub,
        "submit",
        jobs_submit,
        "submit a job: the request body from a JSON or YAML recipe, or - for stdin",
    )
    submit.add_argument(
        "kind", help="merge, elemental, inspect, dump, sweep, bake, import, lora_extract, lora_merge …"
    )
    submit.add_argument("recipe", help="JSON or YAML file with the request body, or - for stdin")
    submit.add_argument("--wait", action="store_true", help="follow its progress; exit 0 only if it succeeds")
    submit.add_argument(
        "--download",
        metavar="DIR",
        help="once it succeeds, download its artifacts and the model it wrote into DIR (implies --wait)",
    )
    submit.add_argument("--force", action="store_true", help="with --download: replace existing files")
    submit.add_argument(
        "--idempotency-key", help="repeat a submission safely: the same key and body give the same job"
    )
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    listing = leaf(jobs_sub, "list", jobs_list, "jobs, newest first")
    listing.add_argument("--kind", help="only jobs of this kind")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    listing.add_argument("--limit", type=int, default=50, help="jobs per page (1-500, default 50)")
    listing.add_argument("--cursor", help="the next page (printed after a full page)")
    job_show = leaf(jobs_sub, "show", jobs_show, "one job: status, progress, result, artifacts, error")
    job_show.add_argument("id")
    watch = leaf(
        jobs_sub,
        "watch",
        jobs_watch,
        "follow a job's progress until it ends; exit 0 only if it succeeds (--json: one JSON line per state)",
    )
    watch.add_argument("id")
    watch.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    cancel = leaf(jobs_sub, "cancel", jobs_cancel, "cancel a queued or running job")
    cancel.add_argument("id")
    job_download = leaf(
        jobs_sub,
        "download",
        jobs_download,
        "download a succeeded job's artifacts and the model it wrote into DIR (streamed, sha256 checked)",
    )
    job_download.add_argument("id")
    job_download.add_argument("dir", metavar="DIR", help="the directory to write into (made if need be)")
    job_download.add_argument("--force", action="store_true", help="replace existing files")
