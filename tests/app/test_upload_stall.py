"""An upload whose validation is slow must not stall the API: /healthz keeps answering while the
real server (a `mergeprobe serve` subprocess) reads pathological checkpoints."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx

from tests.checkpoints.test_checkpoint_headers import (
    _write_st,
    ckpt_of_dict_entries,
    zero_size_tensors_header,
)
from tests.conftest import wait_for
from tests.service.test_embedded_serve import _free_port, _stop, _up

HEALTHZ_INTERVAL = 0.05
HEALTHZ_LIMIT = 1.0


def test_healthz_answers_while_pathological_uploads_are_validated(service, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergeprobe.cli", "serve", "--port", str(port)],
        env={**service.env, "MERGEPROBE_WORKERS": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    responses: dict[str, httpx.Response] = {}
    waits: list[tuple[float, float]] = []  # (seconds since the uploads began, healthz's answer time)
    try:
        # Written while the server starts. Legal but slow to parse: a 59 MB header of 90 k
        # zero-size tensors (under MAX_TENSORS) under 600-character keys takes seconds to read;
        # refused after it as no known architecture.
        slow_header = _write_st(
            tmp_path / "slow-header.safetensors", zero_size_tensors_header(90_000, key_length=600), b""
        )
        # As reported: a pickle of 2.4 M dict entries, refused by the entry cap.
        entries = ckpt_of_dict_entries(tmp_path / "entries.ckpt", 2_400_000)
        wait_for(lambda: _up(base), timeout=60)

        def upload() -> None:
            with httpx.Client(base_url=base, timeout=120) as client:
                for path in (slow_header, entries):
                    responses[path.name] = client.post(
                        "/v1/models", params={"name": path.name}, content=path.read_bytes()
                    )

        uploader = threading.Thread(target=upload, daemon=True)  # no hang if the server dies
        began = time.monotonic()
        uploader.start()
        with httpx.Client(base_url=base, timeout=120) as client:
            while uploader.is_alive():
                sent = time.monotonic()
                assert client.get("/healthz").status_code == 200
                waits.append((sent - began, time.monotonic() - sent))
                time.sleep(HEALTHZ_INTERVAL)
        uploader.join()
    finally:
        _stop(proc)

    header_refusal = responses[slow_header.name]
    assert header_refusal.status_code == 400, header_refusal.text
    assert header_refusal.json()["type"].endswith("/unknown-architecture")
    entries_refusal = responses[entries.name]
    assert entries_refusal.status_code == 400, entries_refusal.text
    assert entries_refusal.json()["type"].endswith("/invalid-checkpoint")
    assert "builds more than 200000 dict entries" in entries_refusal.json()["detail"]
    assert waits, "no /healthz request was made while the uploads were validated"
    stalls = [(at, wait) for at, wait in waits if wait > HEALTHZ_LIMIT]
    assert not stalls, (
        f"/healthz took more than {HEALTHZ_LIMIT} s {len(stalls)} times of {len(waits)} while the uploads "
        "were validated: " + ", ".join(f"{wait:.2f} s at {at:.1f} s" for at, wait in stalls)
    )
