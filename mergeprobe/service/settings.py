"""Service settings, read from the environment (no torch here: the API imports this)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGEPROBE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(default=Path("data"), description="Root of everything the service writes.")
    models_dir: Path | None = Field(default=None, description="Model library; default DATA_DIR/models.")
    artifacts_dir: Path | None = Field(default=None, description="Job artifacts; default DATA_DIR/artifacts.")
    # REDIS_URL is the conventional name, so it carries no MERGEPROBE_ prefix.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    api_keys: str = Field(default="", description="Comma-separated bearer tokens; empty disables auth.")
    workers: int = Field(
        default=1, ge=0, description="Worker subprocesses started by `serve` in embedded mode."
    )
    max_upload_bytes: int = Field(default=16 * 1024**3, gt=0)
    max_request_bytes: int = Field(default=1024**2, gt=0, description="Cap on JSON request bodies.")
    key_prefix: str = Field(default="mergeprobe", description="Prefix of every Redis key and rq queue name.")
    # NoDecode: the validator below parses the JSON itself, so an empty value means "no overrides".
    job_timeouts: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict,
        description="JSON object kind -> seconds, overriding each kind's own limit (mergeprobe/service/kinds.py).",
    )
    worker_ttl: int = Field(
        default=20, ge=3, description="Seconds without a heartbeat before a worker is lost."
    )
    heartbeat_interval: float = Field(default=2.0, gt=0)
    max_queued: int = Field(
        default=1000,
        ge=0,
        description="Jobs that may wait in the queue; submissions beyond it get 429 (0: no limit).",
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="`json`: one JSON object per log line; `text`: plain lines."
    )
    debug_tensor_delay: float = Field(
        default=0.0,
        ge=0,
        description="Fault injection for operators and tests: seconds to sleep per tensor read, to simulate "
        "a slow disk and so exercise cancel and worker-loss paths on tiny models.",
    )
    log_level: str = Field(default="INFO", description="Level of the root logger (DEBUG, INFO, WARNING...).")
    pipeline_configs_dir: Path | None = Field(
        default=None,
        description="An override: diffusers pipeline config folders per architecture (DIR/sd1, DIR/sd2, DIR/sdxl: "
        "model_index.json, unet/, vae/, text_encoder/, scheduler/, tokenizer/ optional) used for a checkpoint "
        "they fit before the configs shipped with mergeprobe (the published sd1, sd2, sdxl ones, CLIP "
        "tokenizers included).",
    )
    generation_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Precision of the pipelines of dump and sweep jobs. `auto`: float16 on CUDA, float32 on a "
        "CPU. `bfloat16` is about 2.5x faster than float32 on a CPU with native bfloat16 (AVX512-BF16 or AMX) "
        "and slower on others. Merges are not affected: they compute in float32.",
    )
    sweep_batch_pixels: int = Field(
        default=32 * 128 * 128,
        ge=0,
        description="Image pixels one pipeline call of a sweep generates: variants that share prompt and seeds "
        "are batched up to this (at least one variant per call). The default is 32 images of 128x128: with 4 "
        "seeds, 8 variants per call at 128x128, 2 at 256x256, one from 512x512 up.",
    )
    sweep_batch_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Memory for the changed U-Net tensors of the variants batched in one sweep call.",
    )
    max_capture_bytes: int = Field(
        default=4 * 1024**3,
        ge=0,
        description="A dump whose captures (saved tensors and images), estimated at submission, would write "
        "more than this is refused with a 400 naming the capture and the estimate.",
    )
    max_capture_memory_bytes: int = Field(
        default=6 * 1024**3,
        ge=0,
        description="A dump that would hold more than this in worker memory (saved tensors until the job ends, "
        "serialised once more at the end) is refused at submission.",
    )
    pipeline_cache_bytes: int = Field(
        default=8 * 1024**3, ge=0, description="Worker memory for cached pipelines (LRU by model sha256)."
    )
    # The model library across hosts: local directory (default) or bytes in an S3-compatible bucket
    # addressed by sha256, with the index (names, headers, variants) in Redis.
    library_backend: Literal["local", "s3"] = Field(
        default="local",
        description="Where the model library lives: `local` (MODELS_DIR on this host) or `s3` (the bucket of "
        "S3_BUCKET under S3_MODELS_PREFIX, indexed in Redis, so every API process and worker shares it).",
    )
    s3_models_prefix: str = Field(
        default="models/", description="Key prefix of the s3 library: models are PREFIX{sha256}."
    )
    model_cache_bytes: int = Field(
        default=64 * 1024**3,
        ge=0,
        description="s3 library: disk a worker gives its local copies of models (DATA_DIR/cache/models, by "
        "sha256); least recently used out first, never one a running job reads.",
    )
    header_cache_bytes: int = Field(
        default=64 * 1024**2,
        ge=0,
        description="Memory for parsed checkpoint headers (estimated size); a header larger than a quarter "
        "of it is not kept.",
    )
    # Artifacts across hosts: local directory (default) or an S3-compatible bucket (AWS S3, MinIO).
    # Credentials come from boto3's chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile, role).
    artifacts_backend: Literal["local", "s3"] = Field(
        default="local", description="Where job artifacts live: `local` (ARTIFACTS_DIR) or `s3`."
    )
    s3_bucket: str | None = Field(
        default=None, description="Bucket of the s3 artifacts and library backends."
    )
    s3_prefix: str = Field(default="artifacts/", description="Key prefix: objects are PREFIX{job_id}/{name}.")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto); unset: AWS.")
    s3_public_endpoint_url: str | None = Field(
        default=None, description="Endpoint clients reach, for presigned URLs; default S3_ENDPOINT_URL."
    )
    s3_region: str | None = Field(default=None, description="Bucket region; unset: boto3's default.")
    s3_downloads: Literal["proxy", "redirect"] = Field(
        default="proxy",
        description="`proxy`: the API streams objects (Range, ETag = sha256); `redirect`: 307 to a presigned URL.",
    )
    s3_presign_seconds: int = Field(
        default=900, ge=1, le=7 * 24 * 3600, description="Presigned URL lifetime."
    )
    # Import jobs make the worker fetch whatever URL a client names, from inside the deployment's
    # network (SSRF): an allow list keeps them to the model stores meant, away from internal services
    # and cloud metadata endpoints. Parsed in mergeprobe/service/model_import.py.
    import_allowed_hosts: str = Field(
        default="",
        description="Comma-separated sources import jobs may fetch from: a host name allows that host and "
        "its subdomains (`huggingface.co` allows `cdn-lfs.huggingface.co`), an IP address itself, "
        "`s3://bucket` that bucket at S3_ENDPOINT_URL. Checked at submission and on every redirect. Empty: "
        "any http(s) host and any bucket the worker's credentials can read.",
    )

    @field_validator("job_timeouts", mode="before")
    @classmethod
    def _parse_timeouts(cls, value):
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else {}
        return value

    @cached_property
    def models_path(self) -> Path:
        return (self.models_dir or self.data_dir / "models").resolve()

    @cached_property
    def artifacts_path(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()

    @cached_property
    def cache_path(self) -> Path:
        return (self.data_dir / "cache").resolve()

    @cached_property
    def model_cache_path(self) -> Path:
        """The s3 library's local copies of models (a worker's cache, also its merges' scratch)."""
        return self.cache_path / "models"

    @cached_property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def ensure_dirs(self) -> None:
        for path in (self.models_path, self.artifacts_path, self.cache_path):
            path.mkdir(parents=True, exist_ok=True)
