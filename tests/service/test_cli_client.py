"""`mergeprobe models …` and `mergeprobe jobs …` against a real service: the API served over HTTP
by uvicorn (in a thread), a real worker process, tiny checkpoints. The CLI runs in-process through
`main(argv)`, and as `python -m mergeprobe.cli` where the process itself matters."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mergeprobe.cli import main
from mergeprobe.client.commands import follow
from mergeprobe.client.http import ApiClient
from mergeprobe.client.output import JobProgress, problem_lines
from tests.conftest import REPO, install_model, running_service, serving

API_KEY = "cli-test-key"
MERGE = {
    "model_a": "tiny-sd1-a",
    "model_b": "tiny-sd1-b",
    "alpha": 0.5,
    "output": {"name": "cli-blend.safetensors"},
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    def __init__(self, service, url: str, idle_url: str) -> None:
        self.service = service
        self.url = url  # with a worker
        self.idle_url = idle_url  # another instance, no worker: its jobs stay queued


@pytest.fixture(scope="module")
def live(redis_url, tmp_path_factory, tiny_models) -> Iterator[Live]:
    from app.main import create_app

    root = tmp_path_factory.mktemp("cli")
    with (
        running_service(redis_url, root / "data") as svc,
        running_service(redis_url, root / "idle") as idle,
    ):
        for key in ("sd1", "sd1-b"):
            install_model(svc, tiny_models[key])
        install_model(idle, tiny_models["sd1"])
        svc.start_worker()
        with (
            serving(create_app(svc.settings(api_keys=API_KEY))) as url,
            serving(create_app(idle.settings(api_keys=API_KEY))) as idle_url,
        ):
            yield Live(svc, url, idle_url)


class Run:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    def json(self):
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"Run(rc={self.rc}, out={self.out[-2000:]!r}, err={self.err[-2000:]!r})"


@pytest.fixture
def cli(live, capsys, monkeypatch):
    """`mergeprobe ARGS` in this process, the service named by MERGEPROBE_URL and MERGEPROBE_API_KEY."""
    monkeypatch.setenv("MERGEPROBE_URL", live.url)
    monkeypatch.setenv("MERGEPROBE_API_KEY", API_KEY)

    def run(*argv, stdin: str | None = None) -> Run:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return Run(rc, out, err)

    return run


def _subprocess(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergeprobe.cli", *argv],
        env={**os.environ, **env},
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )


# -- models ---------------------------------------------------------------------------------------


def test_models_list_and_show(cli, tiny_models):
    listed = cli("models", "list", "--json")
    assert listed.rc == 0, listed
    by_id = {m["id"]: m for m in listed.json()}
    assert {"tiny-sd1-a", "tiny-sd1-b"} <= set(by_id)
    assert by_id["tiny-sd1-a"]["sha256"] == _sha256(tiny_models["sd1"])
    # The options are taken before the subcommand too.
    assert cli("models", "--json", "list").json() == listed.json()

    human = cli("models", "list")
    assert human.rc == 0 and human.out.splitlines()[0].split()[:4] == ["ID", "ARCH", "KIND", "SIZE"]
    assert any(line.startswith("tiny-sd1-b ") and " sd1 " in line for line in human.out.splitlines())

    shown = cli("models", "show", "tiny-sd1-a")
    assert shown.rc == 0, shown
    assert f"sha256:      {by_id['tiny-sd1-a']['sha256']}" in shown.out
    assert "/v1/models/tiny-sd1-a/file" in shown.out
    assert cli("models", "show", by_id["tiny-sd1-a"]["short_hash"], "--json").json() == by_id["tiny-sd1-a"]

    missing = cli("models", "show", "no-such-model")
    assert missing.rc == 1 and "404" in missing.err and "field: id" in missing.err, missing


def test_models_upload_download_rm(cli, tiny_models, tmp_path):
    source = tiny_models["sd1"]
    uploaded = cli("models", "upload", source, "--name", "cli-upload.safetensors", "--json")
    assert uploaded.rc == 0, uploaded
    model = uploaded.json()
    assert model["id"] == "cli-upload" and model["sha256"] == _sha256(source)
    taken = cli("models", "upload", source, "--name", "cli-upload.safetensors")
    assert taken.rc == 1 and "409" in taken.err, taken

    out = tmp_path / "dl"
    out.mkdir()
    got = cli("models", "download", "cli-upload", "-o", f"{out}/")
    assert got.rc == 0, got
    target = out / "cli-upload.safetensors"
    assert target.read_bytes() == source.read_bytes() and model["sha256"] in got.out
    # No overwrite without --force, and no temp file left behind either way.
    again = cli("models", "download", "cli-upload", "-o", target)
    assert again.rc == 1 and "exists" in again.err and "--force" in again.err, again
    target.write_bytes(b"stale")
    forced = cli("models", "download", "cli-upload", "-o", target, "--force", "--json")
    assert forced.rc == 0 and forced.json()["sha256"] == model["sha256"], forced
    assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["cli-upload.safetensors"]

    removed = cli("models", "rm", "cli-upload")
    assert removed.rc == 0 and "deleted cli-upload" in removed.out, removed
    assert cli("models", "show", "cli-upload").rc == 1

    absent = cli("models", "upload", tmp_path / "nope.safetensors")
    assert absent.rc == 2 and "no such file" in absent.err


# -- jobs -----------------------------------------------------------------------------------------


def test_submit_merge_wait_download(cli, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(MERGE))
    out = tmp_path / "out"
    run = cli("jobs", "submit", "merge", recipe, "--wait", "--download", f"{out}/")
    assert run.rc == 0, run
    merged = out / "cli-blend.safetensors"
    assert f"downloaded {merged}" in run.out
    model = cli("models", "show", "cli-blend", "--json").json()
    assert _sha256(merged) == model["sha256"]
    # Not a terminal: one line per status or stage change on stderr, then the outcome.
    assert "running" in run.err and "succeeded in" in run.err, run
    assert "\r" not in run.err

    # The same as YAML from stdin, as JSON out: an elemental merge, with its plan.csv artifact.
    yaml_recipe = (
        "model_a: tiny-sd1-a\nmodel_b: tiny-sd1-b\nalpha: 0.25\n"
        "elemental: 'OUT05:attn2:0.2'\noutput:\n  name: cli-elemental.safetensors\n"
    )
    run = cli("jobs", "submit", "elemental", "-", "--download", out, "--json", stdin=yaml_recipe)
    assert run.rc == 0, run
    job = run.json()
    assert job["status"] == "succeeded" and job["request"]["elemental"] == "OUT05:attn2:0.2"
    downloaded = {d["name"]: d for d in job["downloaded"]}
    assert set(downloaded) == {"plan.csv", "cli-elemental.safetensors"}
    assert _sha256(out / "cli-elemental.safetensors") == job["result"]["model"]["sha256"]
    assert _sha256(out / "plan.csv") == next(a["sha256"] for a in job["artifacts"] if a["name"] == "plan.csv")
    assert run.err == "", "--json shows no progress when stderr is not a terminal"


def test_bad_spec_names_field_and_position(cli, tmp_path):
    recipe = tmp_path / "bad.json"
    spec = "IN00-IN05:0.2, M00:1, OUT00-OUT99:0.7"
    recipe.write_text(json.dumps({**MERGE, "alpha": spec}))
    run = cli("jobs", "submit", "merge", recipe, "--wait")
    assert run.rc == 1, run
    position = spec.index("OUT99")
    assert f"field: alpha, position {position}" in run.err, run
    lines = run.err.splitlines()
    caret = next(i for i, line in enumerate(lines) if line.strip() == "^")
    assert (
        lines[caret - 1].strip() == spec
        and lines[caret].index("^") == lines[caret - 1].index(spec) + position
    )

    as_json = cli("jobs", "submit", "merge", recipe, "--json")
    assert as_json.rc == 1
    problem = as_json.json()
    assert problem["field"] == "alpha" and spec[problem["position"] :].startswith("OUT99")

    # A malformed spec string on a later line of an elemental recipe (YAML this time).
    yaml_recipe = tmp_path / "bad.yaml"
    yaml_recipe.write_text(
        "model_a: tiny-sd1-a\nmodel_b: tiny-sd1-b\nelemental: |\n  OUT05:attn2:0.2\n  OUT05 attn2\n"
    )
    run = cli("jobs", "submit", "elemental", yaml_recipe)
    assert run.rc == 1 and "field: elemental, position" in run.err and "line 2: OUT05 attn2" in run.err, run

    broken = tmp_path / "broken.json"
    broken.write_text('{"model_a": "tiny-sd1-a",\n  "alpha": }')
    run = cli("jobs", "submit", "merge", broken)
    assert run.rc == 2 and "not valid JSON" in run.err and "line 2" in run.err, run
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert cli("jobs", "submit", "merge", listed).rc == 2


def test_submit_list_show_watch(cli, live):
    submitted = cli("jobs", "submit", "inspect", "-", stdin='{"model": "tiny-sd1-a"}')
    assert submitted.rc == 0, submitted
    job_id, kind, status = submitted.out.split()
    assert kind == "inspect" and status in ("queued", "running", "succeeded")

    watched = cli("jobs", "watch", job_id)
    assert watched.rc == 0 and "blocks.csv" in watched.out and "succeeded in" in watched.err, watched
    states = cli("jobs", "watch", job_id, "--json")
    assert states.rc == 0 and json.loads(states.out.splitlines()[-1])["status"] == "succeeded"

    shown = cli("jobs", "show", job_id)
    assert shown.rc == 0 and f"id:         {job_id}" in shown.out and "status:     succeeded" in shown.out
    assert "inputs:     model tiny-sd1-a.safetensors" in shown.out and "blocks.csv" in shown.out, shown
    assert cli("jobs", "show", job_id, "--json").json()["result"]["arch"] == "sd1"

    listed = cli("jobs", "list", "--kind", "inspect", "--json")
    assert listed.rc == 0 and job_id in [j["id"] for j in listed.json()["jobs"]]
    human = cli("jobs", "list", "--limit", "500")
    assert any(line.startswith(job_id) and "succeeded" in line for line in human.out.splitlines()), human


def test_failed_job_exits_nonzero_with_its_problem(cli):
    dead = f"http://127.0.0.1:{_free_port()}/gone.safetensors"
    run = cli("jobs", "submit", "import", "-", "--wait", stdin=json.dumps({"url": dead}))
    assert run.rc == 1, run
    assert "failed" in run.err and "field: url" in run.err, run


def test_cancel_and_watch_a_canceled_job(cli, live):
    submitted = cli(
        "jobs", "submit", "inspect", "-", "--url", live.idle_url, "--json", stdin='{"model": "tiny-sd1-a"}'
    )
    assert submitted.rc == 0 and submitted.json()["status"] == "queued", submitted
    job_id = submitted.json()["id"]
    canceled = cli("jobs", "cancel", job_id, "--url", live.idle_url)
    assert canceled.rc == 0 and canceled.out.strip() == f"{job_id} canceled", canceled
    again = cli("jobs", "cancel", job_id, "--url", live.idle_url, "--json")
    assert again.rc == 0 and again.json()["status"] == "canceled"
    watched = cli("jobs", "watch", job_id, "--url", live.idle_url)
    assert watched.rc == 1 and f"job {job_id} canceled" in watched.err, watched
    assert cli("jobs", "cancel", "0" * 24, "--url", live.idle_url).rc == 1


# -- the service, the key, the process ----------------------------------------------------------


def test_api_key_required(cli, monkeypatch):
    monkeypatch.delenv("MERGEPROBE_API_KEY")
    refused = cli("models", "list")
    assert refused.rc == 1 and "401" in refused.err and "Authorization" in refused.err, refused
    assert cli("models", "list", "--api-key", "wrong").rc == 1
    assert cli("models", "list", "--api-key", API_KEY, "--json").rc == 0


def test_subprocess_url_from_environment_and_stdout_download(live, tiny_models):
    env = {"MERGEPROBE_URL": live.url, "MERGEPROBE_API_KEY": API_KEY}
    listed = _subprocess("models", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "tiny-sd1-a" in {m["id"] for m in json.loads(listed.stdout)}
    piped = _subprocess("models", "download", "tiny-sd1-a", "-o", "-", env=env)
    assert piped.returncode == 0 and piped.stdout == tiny_models["sd1"].read_bytes(), piped.stderr


def test_connection_refused_is_one_line(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    done = _subprocess("jobs", "list", env={"MERGEPROBE_URL": url})
    assert done.returncode == 1
    err = done.stderr.decode()
    assert err.count("\n") == 1 and "connection refused" in err and url in err and "Traceback" not in err, err


def test_usage_errors_exit_2(capsys):
    for argv in (
        ["jobs"],
        ["jobs", "list", "--status", "done"],
        ["models", "show"],
        ["jobs", "submit", "merge"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
    capsys.readouterr()


# -- pieces without a service -------------------------------------------------------------------


def test_progress_bar_on_a_terminal_and_lines_elsewhere():
    def job(status, stage="", done=0, total=0):
        return {"id": "j", "status": status, "progress": {"completed": done, "total": total, "stage": stage}}

    tty = io.StringIO()
    now = [100.0]
    bar = JobProgress(tty, tty=True, label="j ", clock=lambda: now[0])
    bar.update(job("running", "merging tensors", 0, 100))
    now[0] += 10  # 10 s into the stage, half done
    bar.update(job("running", "merging tensors", 50, 100))
    bar.finish(
        {**job("succeeded"), "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:20Z"}
    )
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "\n" not in text[:-1]
    assert "merging tensors" in text and "50/100 50%" in text and "ETA 0:10" in text
    assert "j succeeded in 20.0 s" in text

    plain = io.StringIO()
    lines = JobProgress(plain, tty=False, label="j ")
    for state in (
        job("queued"),
        job("running", "a", 1, 9),
        job("running", "a", 5, 9),
        job("running", "b", 1, 2),
    ):
        lines.update(state)
    lines.finish(job("succeeded"))
    assert plain.getvalue().splitlines() == [
        "j queued",
        "j running  a  [##" + "." * 22 + "] 1/9 11%",
        "j running  b  [############............] 1/2 50%",
        "j succeeded",
    ]


def test_problem_caret_in_a_multiline_spec():
    spec = "OUT05:attn2:0.2\nIN99:x:1"
    lines = problem_lines(
        {"status": 400, "title": "Invalid", "detail": "no block IN99", "field": "elemental", "position": 16},
        {"elemental": spec},
    )
    assert lines[-2:] == ["    line 2: IN99:x:1", "    " + " " * len("line 2: ") + "^"]


@contextmanager
def _stub(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A stand-in server on a free port, for what a real service does not do on cue."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_body(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_redirect_to_another_origin_drops_the_key(tmp_path):
    """A 307 to an object store (a presigned URL) gets the bytes there, without the bearer token."""
    seen: dict[str, str | None] = {}
    payload = b"model bytes" * 1000

    class Store(_Quiet):
        def do_GET(self):
            seen["store"] = self.headers.get("Authorization")
            self.send_body(200, payload, "application/octet-stream")

    with _stub(Store) as store_url:

        class Api(_Quiet):
            def do_GET(self):
                seen["api"] = self.headers.get("Authorization")
                self.send_response(307)
                self.send_header("Location", f"{store_url}/bucket/x?sig=1")
                self.send_header("Content-Length", "0")
                self.end_headers()

        with _stub(Api) as api_url:
            client = ApiClient(api_url, api_key="k")
            size, digest = client.download("/v1/models/x/file", tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").read_bytes() == payload and size == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()
    assert seen == {"api": "Bearer k", "store": None}


def test_watch_follows_a_job_across_a_broken_event_stream():
    """The events stream breaks off mid-job (a restart, a proxy): the client asks for the job and
    follows it again."""
    states = iter(["running", "succeeded"])
    calls: list[str] = []

    def job(status: str) -> dict:
        return {
            "id": "j",
            "kind": "inspect",
            "status": status,
            "progress": {"completed": 1, "total": 2, "stage": "s"},
        }

    class Api(_Quiet):
        def do_GET(self):
            calls.append(self.path)
            if self.path == "/v1/jobs/j":
                self.send_body(200, json.dumps(job("running")).encode())
                return
            status = next(states)
            event = f"event: job\ndata: {json.dumps(job(status))}\n\n"
            if status == "succeeded":
                event += "event: end\ndata: {}\n\n"
            self.send_body(200, event.encode(), "text/event-stream")  # then the connection closes

    seen = []
    with _stub(Api) as url:
        final = follow(ApiClient(url), "j", lambda j: seen.append(j["status"]))
    assert final["status"] == "succeeded"
    assert calls == ["/v1/jobs/j/events", "/v1/jobs/j", "/v1/jobs/j/events"]
    assert seen == ["running", "running", "succeeded"]


# -- local errors, retries, escaping, downloads all or nothing ---------------------------------


def _one_line_error(run: Run) -> None:
    assert run.err.count("\n") == 1 and "Traceback" not in run.err, run


def test_local_errors_are_one_line(cli, live, tmp_path, monkeypatch):
    name = cli("models", "show", "tiny-sd1-a", "--json").json()["name"]
    nowhere = cli("models", "download", "tiny-sd1-a", "-o", "/proc/nonexistent/")
    assert nowhere.rc == 1 and "/proc/nonexistent" in nowhere.err, nowhere
    _one_line_error(nowhere)
    (tmp_path / "out" / name).mkdir(parents=True)
    onto_dir = cli("models", "download", "tiny-sd1-a", "-o", f"{tmp_path / 'out'}/", "--force")
    assert onto_dir.rc == 1 and "is a directory" in onto_dir.err, onto_dir
    _one_line_error(onto_dir)

    bad_port = cli("models", "list", "--url", "http://h:80x0")
    assert bad_port.rc == 2 and "port" in bad_port.err, bad_port
    _one_line_error(bad_port)

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": "tiny-sd1-a"}))
    before = len(cli("jobs", "list", "--url", live.idle_url, "--json").json()["jobs"])
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    into_file = cli("jobs", "submit", "inspect", recipe, "--download", a_file, "--url", live.idle_url)
    assert into_file.rc == 2 and "not a directory" in into_file.err, into_file
    _one_line_error(into_file)
    assert len(cli("jobs", "list", "--url", live.idle_url, "--json").json()["jobs"]) == before

    unreadable = tmp_path / "locked.safetensors"
    unreadable.write_bytes(b"x")
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):
        if self == unreadable:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    refused = cli("models", "upload", unreadable)
    assert refused.rc == 2 and "cannot read it: Permission denied" in refused.err, refused
    _one_line_error(refused)


def _job(status: str, **extra) -> dict:
    return {"id": "j", "kind": "inspect", "status": status, "progress": {}, **extra}


def test_watch_retries_gateway_errors_with_backoff(monkeypatch):
    from mergeprobe.client import commands

    pauses: list[float] = []
    monkeypatch.setattr(commands, "_pause", pauses.append)
    answers = [503, 502, 429, 504, 200]

    class Api(_Quiet):
        def do_GET(self):
            status = answers.pop(0) if answers else 200
            if status != 200:
                self.send_body(status, b'{"title": "gateway"}')
                return
            event = f"event: job\ndata: {json.dumps(_job('succeeded'))}\n\nevent: end\ndata: {{}}\n\n"
            self.send_body(200, event.encode(), "text/event-stream")

    with _stub(Api) as url:
        assert follow(ApiClient(url), "j", lambda j: None)["status"] == "succeeded"
        assert pauses == [1.0, 2.0, 4.0, 5.0]
        # Bounded: more than EVENT_RETRIES in a row, and the last answer is the error.
        answers[:] = [503] * (commands.EVENT_RETRIES + 1)
        with pytest.raises(commands.ApiError) as failed:
            follow(ApiClient(url), "j", lambda j: None)
        assert failed.value.status == 503
        # Anything else is not retried.
        pauses.clear()
        answers[:] = [500]
        with pytest.raises(commands.ApiError):
            follow(ApiClient(url), "j", lambda j: None)
        assert pauses == []


def _service(routes: dict[str, tuple[int, bytes]]):
    class Api(_Quiet):
        def do_GET(self):
            status, body = routes.get(self.path.split("?")[0], (404, b'{"title": "Not Found"}'))
            kind = "application/json" if body[:1] in (b"{", b"[") else "application/octet-stream"
            self.send_body(status, body, kind)

    return _stub(Api)


def test_service_text_is_escaped_for_people_not_in_json(cli, monkeypatch):
    esc = "\x1b]0;pwned\x07\x1b[2J"
    model = {
        "id": "m",
        "name": f"m{esc}\nsha256:      forged",
        "sha256": "0" * 64,
        "metadata": {f"key{esc}": f"value{esc}", "k\x9b2": "v"},
    }
    job = _job(
        "failed",
        warnings=[f"careful{esc}\nwarning:    forged"],
        error={"status": 400, "title": f"Bad{esc}", "detail": f"detail\x7f{esc}"},
    )
    routes = {
        "/v1/models/m": (200, json.dumps(model).encode()),
        "/v1/jobs/j": (200, json.dumps(job).encode()),
        "/v1/models": (200, json.dumps({"models": [model]}).encode()),
        "/v1/models/gone": (404, json.dumps({"title": "Not Found", "detail": f"no{esc}"}).encode()),
    }
    with _service(routes) as url:
        for argv in (
            ["models", "show", "m"],
            ["models", "list"],
            ["jobs", "show", "j"],
            ["models", "show", "gone"],
        ):
            run = cli(*argv, "--url", url)
            text = run.out + run.err
            assert not any(c in text for c in "\x1b\x07\x7f\x9b\r"), (argv, run)
            assert "\\x1b" in text, (argv, run)
            assert "\nsha256:      forged" not in text and "\nwarning:    forged" not in text, run
        shown = cli("models", "show", "m", "--url", url)
        assert "metadata:    2 entries: key\\x1b]0;pwned\\x07\\x1b[2J, k\\x9b2" in shown.out, shown
        as_json = cli("models", "show", "m", "--url", url, "--json")
        assert as_json.json() == model


def test_job_download_checks_every_destination_first(cli, tmp_path):
    files = {"a.csv": b"a" * 10, "b.csv": b"b" * 20, "m.safetensors": b"m" * 30}

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    artifacts = [{"name": n, "url": f"/files/{n}", "sha256": sha(files[n])} for n in ("a.csv", "b.csv")]
    model = {
        "name": "m.safetensors",
        "download_url": "/files/m.safetensors",
        "sha256": sha(files["m.safetensors"]),
    }
    job = _job("succeeded", artifacts=artifacts, result={"model": model})
    routes = {f"/files/{n}": (200, data) for n, data in files.items()}
    routes["/v1/jobs/j"] = (200, json.dumps(job).encode())
    routes["/v1/jobs/q"] = (200, json.dumps(_job("queued", id="q")).encode())
    twice = _job("succeeded", id="d", artifacts=[artifacts[0], {**artifacts[1], "name": "a.csv"}])
    routes["/v1/jobs/d"] = (200, json.dumps(twice).encode())
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.csv").write_bytes(b"mine")
    with _service(routes) as url:
        refused = cli("jobs", "download", "j", out, "--url", url)
        assert refused.rc == 1 and "b.csv exists" in refused.err and "nothing downloaded" in refused.err
        assert sorted(p.name for p in out.iterdir()) == ["b.csv"], "nothing half downloaded"
        assert (out / "b.csv").read_bytes() == b"mine"

        dup = cli("jobs", "download", "d", tmp_path / "dup", "--url", url)
        assert dup.rc == 1 and "two files named 'a.csv'" in dup.err and not (tmp_path / "dup").exists(), dup
        queued = cli("jobs", "download", "q", tmp_path / "q", "--url", url)
        assert queued.rc == 1 and "queued" in queued.err and "jobs watch q" in queued.err, queued

        forced = cli("jobs", "download", "j", out, "--force", "--url", url, "--json")
        assert forced.rc == 0, forced
        assert {d["name"] for d in forced.json()["downloaded"]} == set(files)
        assert all((out / n).read_bytes() == data for n, data in files.items())
        fresh = cli("jobs", "download", "j", tmp_path / "new" / "dir", "--url", url)
        assert fresh.rc == 0 and fresh.out.count("downloaded ") == 3, fresh


def test_jobs_download_a_finished_job(cli, tmp_path):
    done = cli("jobs", "submit", "inspect", "-", "--wait", "--json", stdin='{"model": "tiny-sd1-a"}')
    assert done.rc == 0, done
    job = done.json()
    out = tmp_path / "results"
    got = cli("jobs", "download", job["id"], out)
    assert got.rc == 0 and f"downloaded {out / 'blocks.csv'}" in got.out, got
    blocks = next(a for a in job["artifacts"] if a["name"] == "blocks.csv")
    assert _sha256(out / "blocks.csv") == blocks["sha256"]
    again = cli("jobs", "download", job["id"], out)
    assert again.rc == 1 and "exists" in again.err, again
    assert cli("jobs", "download", job["id"], out, "--force").rc == 0
