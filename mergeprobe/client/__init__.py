"""A client of the mergeprobe API: the transport (`ApiClient`) and the `mergeprobe models` and
`mergeprobe jobs` commands built on it. Standard library only."""

from mergeprobe.client.http import DEFAULT_URL, ApiClient, ApiError, ClientError

__all__ = ["DEFAULT_URL", "ApiClient", "ApiError", "ClientError"]
