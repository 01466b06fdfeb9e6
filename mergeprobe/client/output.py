"""What the client prints for people: problems with their field and position, tables, sizes,
durations, and a job's progress (a bar on a terminal, a line per stage otherwise)."""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime
from typing import Any, TextIO

FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})

# What a terminal would act on rather than show: C0 controls (ESC starts the sequences that move
# the cursor, recolour, retitle the window, write the clipboard), DEL, and the C1 controls (CSI is
# U+009B). Text from the service (names, metadata, warnings, problems) is shown with them escaped.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # \t and \n kept
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\x{ord(char):02x}"


def one_line(value: Any) -> str:
    """A value as printable text on one line: every control character escaped (`\\x1b`, `\\n`)."""
    return _CONTROLS.sub(_escape, value if isinstance(value, str) else str(value))


def printable(text: str) -> str:
    """Text for a terminal, its lines and tabs kept, every other control character escaped."""
    return _CONTROLS_BUT_LINES.sub(_escape, text)


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def job_duration(job: dict[str, Any]) -> float | None:
    started, finished = _parse_time(job.get("started_at")), _parse_time(job.get("finished_at"))
    if started and finished:
        return (finished - started).total_seconds()
    return None


def table(rows: list[list[str]], headers: list[str]) -> str:
    rows = [[one_line(c) for c in row] for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def dump_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2) + "\n")


def _value_at(request: Any, field: str | None) -> Any:
    """The request's value at a problem's `field` (`alpha`, `output.dtype`, `seeds.1`), if any."""
    if not field or request is None:
        return None
    value = request
    for part in field.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _caret(spec: str, position: int) -> list[str]:
    """The line of a spec string that holds `position`, and a caret under that character."""
    start = spec.rfind("\n", 0, position) + 1
    end = spec.find("\n", position)
    line = spec[start : end if end >= 0 else len(spec)]
    column = len(one_line(line[: position - start].replace("\t", " ")))  # escapes widen the line
    prefix = f"line {spec.count(chr(10), 0, start) + 1}: " if "\n" in spec else ""
    shown = one_line(line.replace("\t", " "))
    return [f"    {prefix}{shown}", "    " + " " * (len(prefix) + column) + "^"]


def problem_lines(problem: dict[str, Any], request: Any = None) -> list[str]:
    """A problem document as lines: title and detail, the field, the position with a caret under
    it in the field's spec string when the request that caused it is known."""
    status = problem.get("status")
    title = one_line(problem.get("title") or "error")
    slug = one_line(str(problem.get("type", "")).rsplit("/", 1)[-1])
    head = f"{status} {title}" if status else title
    if slug and slug not in ("about:blank",):
        head += f" ({slug})"
    lines = [head]
    errors = [e for e in problem.get("errors") or [] if isinstance(e, dict) and e.get("message")]
    detail = one_line(problem["detail"]) if problem.get("detail") else None
    if detail and detail != title and not errors:  # errors say it again
        lines.append(f"  {detail}")
    field, position = problem.get("field"), problem.get("position")
    if field is not None:
        where = f", position {one_line(position)}" if position is not None else ""
        lines.append(f"  field: {one_line(field)}{where}")
        value = _value_at(request, field)
        if isinstance(value, str) and isinstance(position, int) and 0 <= position <= len(value):
            lines += _caret(value, position)
    for error in errors:
        lines.append(f"  - {one_line(error.get('field') or '?')}: {one_line(error['message'])}")
    return lines


class JobProgress:
    """Shows a job's progress from its successive states: on a terminal one line rewritten with
    carriage returns (status, stage, bar, step, ETA); elsewhere one line per status or stage change."""

    def __init__(
        self, out: TextIO, tty: bool, label: str = "", min_interval: float = 0.1, clock=time.monotonic
    ) -> None:
        self.clock = clock
        self.out = out
        self.tty = tty
        self.label = one_line(label)
        self.min_interval = min_interval
        self._key: tuple[str, str] | None = None
        self._stage_start: tuple[float, int] = (0.0, 0)
        self._last_draw = 0.0
        self._drawn = 0

    def eta(self, completed: int, total: int, now: float) -> float | None:
        started, done_then = self._stage_start
        rate = (completed - done_then) / (now - started) if now > started else 0.0
        if total <= 0 or completed >= total or rate <= 0:
            return None
        return (total - completed) / rate

    def line(self, job: dict[str, Any], now: float) -> str:
        progress = job.get("progress") or {}
        completed, total = int(progress.get("completed") or 0), int(progress.get("total") or 0)
        stage = one_line(progress.get("stage") or "")
        parts = [f"{self.label}{one_line(job.get('status', '?'))}"]
        if stage and job.get("status") == "running":
            parts.append(stage)
        if total > 0 and job.get("status") == "running":
            width = 24
            filled = min(width, int(width * completed / total))
            parts.append(
                f"[{'#' * filled}{'.' * (width - filled)}] {completed}/{total} {100 * completed // total}%"
            )
            eta = self.eta(completed, total, now)
            if eta is not None:
                parts.append(f"ETA {human_duration(eta)}")
        return "  ".join(parts)

    def update(self, job: dict[str, Any]) -> None:
        now = self.clock()
        progress = job.get("progress") or {}
        key = (str(job.get("status")), str(progress.get("stage") or ""))
        changed = key != self._key
        if changed:
            self._key = key
            self._stage_start = (now, int(progress.get("completed") or 0))
        if not self.tty:
            if changed and job.get("status") not in FINAL_STATUSES:
                self.out.write(self.line(job, now) + "\n")
                self.out.flush()
            return
        if not changed and now - self._last_draw < self.min_interval:
            return
        self._draw(self.line(job, now), now)

    def _draw(self, text: str, now: float) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        text = text[: max(10, columns - 1)]
        self.out.write("\r" + text + " " * max(0, self._drawn - len(text)))
        self.out.flush()
        self._drawn = len(text)
        self._last_draw = now

    def finish(self, job: dict[str, Any]) -> None:
        """The final state: the bar ends its line, and the outcome is said."""
        took = job_duration(job)
        text = f"{self.label}{one_line(job.get('status'))}" + (
            f" in {took:.1f} s" if took is not None else ""
        )
        if self.tty:
            self._draw(text, self.clock())
            self.out.write("\n")
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def interrupt(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()


def transfer_progress(out: TextIO, label: str):
    """A byte counter for uploads and downloads on a terminal (None elsewhere)."""
    if not out.isatty():
        return None
    label = one_line(label)
    state = {"last": 0.0, "start": time.monotonic()}

    def show(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - state["last"] < 0.1 and done != total:
            return
        state["last"] = now
        elapsed = max(now - state["start"], 1e-6)
        rate = done / elapsed
        text = f"\r{label}  {human_size(done)}"
        if total:
            text += f" / {human_size(total)} {100 * done // max(total, 1)}%"
            if rate > 0 and done < total:
                text += f"  ETA {human_duration((total - done) / rate)}"
        text += f"  {human_size(int(rate))}/s"
        out.write(text.ljust(79))
        if total is not None and done >= total:
            out.write("\n")
        out.flush()

    return show
