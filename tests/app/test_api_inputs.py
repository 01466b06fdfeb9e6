"""Bad input: each gets its 4xx problem+json naming the field, nothing crashes,
nothing is written outside the data directory."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

from tests.conftest import install_model

PROBLEM = "application/problem+json"


def assert_problem(response, status, field=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("https://")
    if field is not None:
        assert body["field"] == field, body
    return body


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_unknown_model_and_schema_errors(client):
    assert_problem(client.post("/v1/jobs/inspect", json={"model": "nope"}), 404, "model")
    assert_problem(client.post("/v1/jobs/inspect", json={}), 422, "model")
    assert_problem(client.post("/v1/jobs/inspect", json={"model": "x", "extra": 1}), 422, "extra")
    body = assert_problem(
        client.post("/v1/jobs/inspect", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "body",
    )
    assert "JSON" in body["detail"]
    assert_problem(client.post("/v1/jobs/teleport", json={}), 404, "kind")
    assert_problem(client.get("/v1/jobs/0123456789abcdef01234567"), 404, "id")
    assert_problem(client.get("/v1/archs/sd9/blocks"), 404, "arch")


@pytest.mark.parametrize(
    "ref", ["../secret.safetensors", "..", "a/b.safetensors", ".hidden.safetensors", "x" * 300]
)
def test_path_traversal_in_model_refs(client, ref):
    response = client.post("/v1/jobs/inspect", json={"model": ref})
    assert response.status_code in (400, 404)
    assert response.headers["content-type"] == PROBLEM and response.json()["field"] == "model"


def test_symlink_out_of_library_refused(service, client, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    os.symlink(outside, service.models_dir / "link.safetensors")
    assert_problem(client.post("/v1/jobs/inspect", json={"model": "link"}), 400, "model")
    assert_problem(client.get("/v1/models/link"), 400, "id")


def _safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_truncated_and_oversized_headers(service, client, tiny_models):
    good = tiny_models["sd1"].read_bytes()
    (service.models_dir / "cut.safetensors").write_bytes(good[: len(good) // 2])
    body = assert_problem(client.post("/v1/jobs/inspect", json={"model": "cut"}), 400, "model")
    assert "truncated" in body["detail"].lower()
    (service.models_dir / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    body = assert_problem(client.post("/v1/jobs/inspect", json={"model": "huge"}), 400, "model")
    assert "100" in body["detail"]
    # Broken files do not break the listing.
    assert client.get("/v1/models").status_code == 200


def _evil_ckpt(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"state_dict": {"w": Evil()}}, protocol=2))
        zf.writestr("archive/version", "3\n")


def test_ckpt_whose_pickle_would_run_code(service, client, tmp_path):
    marker = tmp_path / "pwned"
    _evil_ckpt(service.models_dir / "evil.ckpt", marker)
    body = assert_problem(client.post("/v1/jobs/inspect", json={"model": "evil.ckpt"}), 400, "model")
    assert "system" in body["detail"]
    upload = tmp_path / "evil-upload.ckpt"
    _evil_ckpt(upload, marker)
    before = tree(service.data_dir)
    response = client.post("/v1/models", params={"name": "evil2.ckpt"}, content=upload.read_bytes())
    assert_problem(response, 400, "body")
    assert not marker.exists()
    assert tree(service.data_dir) == before


def test_upload_validation_and_cap(service, client, tiny_models, tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app

    before = tree(service.data_dir)
    assert_problem(
        client.post("/v1/models", params={"name": "../x.safetensors"}, content=b"abc"), 400, "name"
    )
    assert_problem(client.post("/v1/models", params={"name": "x.exe"}, content=b"abc"), 400, "name")
    assert_problem(
        client.post("/v1/models", params={"name": "junk.safetensors"}, content=b"not a model"), 400, "body"
    )
    assert tree(service.data_dir) == before

    small = create_app(service.settings(max_upload_bytes=1000))
    with TestClient(small) as capped:
        big = tiny_models["sd1"].read_bytes()
        body = assert_problem(
            capped.post("/v1/models", params={"name": "big.safetensors"}, content=big), 413, "body"
        )
        assert "1000" in body["detail"]

        def chunks():  # no Content-Length: the cap applies while streaming
            for i in range(0, len(big), 256):
                yield big[i : i + 256]

        assert_problem(
            capped.post("/v1/models", params={"name": "big.safetensors"}, content=chunks()), 413, "body"
        )
    assert tree(service.data_dir) == before

    data = tiny_models["sd1-b"].read_bytes()
    created = client.post("/v1/models", params={"name": "uploaded.safetensors"}, content=data)
    assert created.status_code == 201, created.text
    info = created.json()
    assert created.headers["location"] == "/v1/models/uploaded"
    import hashlib

    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["short_hash"] == info["sha256"][:10]
    assert info["arch"] == "sd1" and info["size_bytes"] == len(data)
    assert_problem(
        client.post("/v1/models", params={"name": "uploaded.safetensors"}, content=data), 409, "name"
    )


def test_json_body_over_cap(client):
    response = client.post(
        "/v1/jobs/inspect",
        content=b"[" + b"1," * 700_000 + b"1]",
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 413, "body")


def test_model_library_crud(service, client, tiny_models):
    install_model(service, tiny_models["sd1"])
    install_model(service, tiny_models["sdxl"])
    install_model(service, tiny_models["sd1-ckpt"])
    listing = client.get("/v1/models").json()["models"]
    by_id = {m["id"]: m for m in listing}
    assert set(by_id) == {"tiny-sd1-a", "tiny-sdxl-a", "tiny-sd1-c"}
    assert by_id["tiny-sdxl-a"]["arch"] == "sdxl" and by_id["tiny-sd1-c"]["format"] == "ckpt"
    one = client.get("/v1/models/tiny-sd1-a").json()
    assert one == by_id["tiny-sd1-a"] and one["metadata"].get("format") == "pt"
    assert client.get(f"/v1/models/{one['short_hash']}").json()["name"] == "tiny-sd1-a.safetensors"
    assert client.delete("/v1/models/tiny-sd1-a").status_code == 204
    assert_problem(client.get("/v1/models/tiny-sd1-a"), 404, "id")
    assert_problem(client.delete("/v1/models/tiny-sd1-a"), 404, "id")


@pytest.mark.parametrize("auth", [True, False])
def test_auth_on_and_off(service, tiny_models, auth):
    from fastapi.testclient import TestClient

    from app.main import create_app

    install_model(service, tiny_models["sd1"])
    settings = service.settings(api_keys="k1,k2" if auth else "")
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        job = None
        for path in ("/v1/models", "/v1/archs", "/v1/jobs", "/openapi.json", "/readyz"):
            response = c.get(path)
            if auth:
                assert_problem(response, 401, "Authorization")
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
                assert c.get(path, headers={"Authorization": "Bearer k2"}).status_code in (200, 503)
            else:
                assert response.status_code in (200, 503)
        headers = {"Authorization": "Bearer k1"} if auth else {}
        job = c.post("/v1/jobs/inspect", json={"model": "tiny-sd1-a"}, headers=headers).json()
        service.start_worker()
        from tests.conftest import wait_for

        def finished():
            j = c.get(f"/v1/jobs/{job['id']}", headers=headers).json()
            return j if j["status"] == "succeeded" else None

        done = wait_for(finished, 60)
        url = done["artifacts"][0]["url"]
        if auth:
            assert_problem(c.get(url), 401)
        assert c.get(url, headers=headers).status_code == 200


def _auth_app(keys=("k1", "k2")):
    """BearerAuth in front of an app that answers 200 for whatever it is let through."""
    from starlette.responses import PlainTextResponse

    from app.middleware import BearerAuth

    async def ok(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await PlainTextResponse("ok")(scope, receive, send)

    return BearerAuth(ok, list(keys))


def _download_cookie(key: str, expiry: int) -> dict[str, str]:
    from app.middleware import DOWNLOAD_COOKIE, download_token

    return {"Cookie": f"{DOWNLOAD_COOKIE}={download_token(key, expiry)}"}


def test_download_token_reads_files_and_artifacts_only():
    """The console's HttpOnly cookie: a token derived from a key (never the key), accepted for
    GET/HEAD of model files and artifacts only, while it has not expired and its MAC is a key's."""
    import time

    from fastapi.testclient import TestClient

    from app.middleware import DOWNLOAD_COOKIE

    later = int(time.time()) + 3600
    downloads = ("/v1/models/m/file", "/v1/jobs/j/artifacts/image_0.png", "/v1/jobs/j/artifacts.zip")
    with TestClient(_auth_app()) as c:
        for path in downloads:
            assert c.get(path, headers=_download_cookie("k2", later)).status_code == 200, path
            assert c.head(path, headers=_download_cookie("k1", later)).status_code == 200, path
            assert c.get(path).status_code == 401
            # Expired, forged, signed by a key not configured, or the raw key (as consoles kept it).
            assert c.get(path, headers=_download_cookie("k1", int(time.time()) - 1)).status_code == 401
            assert c.get(path, headers=_download_cookie("other", later)).status_code == 401
            forged = {"Cookie": f"{DOWNLOAD_COOKIE}={later}.{'0' * 64}"}
            assert c.get(path, headers=forged).status_code == 401
            assert c.get(path, headers={"Cookie": f"{DOWNLOAD_COOKIE}=k1"}).status_code == 401
            assert c.get(path, headers={"Cookie": "mergeprobe_key=k1"}).status_code == 401
            # Never for a change.
            for method in ("DELETE", "POST", "PUT"):
                assert c.request(method, path, headers=_download_cookie("k1", later)).status_code == 401
        for path in ("/v1/models", "/v1/jobs", "/v1/models/m", "/openapi.json", "/v1/console/session"):
            assert c.get(path, headers=_download_cookie("k1", later)).status_code == 401, path
        # A path that only starts like a download (a trailing newline matched `$`).
        assert c.get("/v1/models/m/file%0a", headers=_download_cookie("k1", later)).status_code == 401


def test_auth_under_a_root_path():
    """`--root-path /mp`: the routes are matched without the prefix, as the app routes them."""
    import time

    from fastapi.testclient import TestClient

    with TestClient(_auth_app(), root_path="/mp") as c:
        assert c.get("/mp/healthz").status_code == 200
        assert c.get("/mp/docs").status_code == 200
        assert c.get("/mp/static/console/main.js").status_code == 200
        assert c.get("/mp/v1/models").status_code == 401
        assert c.get("/mp/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        later = int(time.time()) + 3600
        assert c.get("/mp/v1/models/m/file", headers=_download_cookie("k1", later)).status_code == 200


def test_console_session_sets_an_httponly_download_cookie(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.middleware import DOWNLOAD_TOKEN_SECONDS, download_token
    from mergeprobe.service.settings import Settings

    settings = Settings(redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path, api_keys="k1,secret-key")
    for root in ("", "/mp"):
        with TestClient(create_app(settings), root_path=root) as c:
            assert_problem(c.post(f"{root}/v1/console/session"), 401, "Authorization")
            response = c.post(f"{root}/v1/console/session", headers={"Authorization": "Bearer secret-key"})
            assert response.status_code == 204
            (cookie,) = response.headers.get_list("set-cookie")
            assert "secret-key" not in cookie
            name_value, *attributes = [a.strip() for a in cookie.split(";")]
            name, _, token = name_value.partition("=")
            assert name == "mergeprobe_download"
            expiry = int(token.split(".")[0])
            assert token == download_token("secret-key", expiry)
            attrs = {a.split("=")[0].lower(): a.partition("=")[2] for a in attributes}
            assert "httponly" in attrs and attrs["samesite"].lower() == "strict"
            assert attrs["path"] == f"{root}/v1/" and attrs["max-age"] == str(DOWNLOAD_TOKEN_SECONDS)
            assert "secure" not in attrs  # plain http here; https gets Secure
            https = c.post(
                f"https://testserver{root}/v1/console/session", headers={"Authorization": "Bearer k1"}
            )
            assert "secure" in https.headers["set-cookie"].lower()
            # "Forget key": the server drops what no script can.
            gone = c.delete(f"{root}/v1/console/session", headers={"Authorization": "Bearer k1"})
            assert gone.status_code == 204
            assert "max-age=0" in gone.headers["set-cookie"].lower()
            assert f"path={root}/v1/" in gone.headers["set-cookie"].lower()
