"""Service settings, read from the environment (no torch here: the API imports this)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Seconds a job of each kind may run before rq stops it. A merge of two SDXL
# checkpoints from a slow disk is the longest thing we do.
DEFAULT_JOB_TIMEOUTS = {
    "inspect": 1800,
    "merge": 3 * 3600,
    "elemental": 3 * 3600,
    "dump": 3600,
    "sweep": 6 * 3600,
}


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
    job_timeouts: dict[str, int] = Field(default_factory=dict, description="JSON object kind -> seconds.")
    worker_ttl: int = Field(
        default=20, ge=3, description="Seconds without a heartbeat before a worker is lost."
    )
    heartbeat_interval: float = Field(default=2.0, gt=0)
    pipeline_configs_dir: Path | None = Field(
        default=None,
        description="Diffusers pipeline config directories per architecture (DIR/sd1, DIR/sd2, DIR/sdxl: "
        "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) for loading full-size "
        "single-file checkpoints offline.",
    )
    pipeline_cache_bytes: int = Field(
        default=8 * 1024**3, ge=0, description="Worker memory for cached pipelines (LRU by model sha256)."
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
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def timeout_for(self, kind: str) -> int:
        return int(self.job_timeouts.get(kind, DEFAULT_JOB_TIMEOUTS.get(kind, 3600)))

    def ensure_dirs(self) -> None:
        for path in (self.models_path, self.artifacts_path, self.cache_path):
            path.mkdir(parents=True, exist_ok=True)
