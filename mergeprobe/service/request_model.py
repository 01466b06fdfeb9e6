"""The base of every request body the API accepts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    """Unknown fields are errors, and numbers are finite: JSON's `NaN`, `Infinity` and numbers
    beyond float64 (`1e999`) are refused where they are read, instead of becoming `null` when the
    request is stored and running another recipe."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
