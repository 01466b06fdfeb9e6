"""Tests of The HTTP API: routes, validation, problem details, the OpenAPI contract."""
