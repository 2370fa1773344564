"""The bounds on what one client may make `slc serve` hold, with their defaults (params.yaml's
`serving` section and the README list them): the request head's bytes and fields, and the time a
request may take. serving.bounded enforces them, before the token is checked; the body's bound is
serving.http's, from `serving.max_batch`. Plain values, so `slc info` and `slc score` import them
without the HTTP packages.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The bounds of `slc serve` (params.yaml's `serving` section; the README lists the defaults)."""
    max_header_bytes: int = 16_384     # the request line and header fields together (h11's own default)
    max_headers: int = 100             # header fields (Apache's LimitRequestFields)
    request_timeout_s: float = 60.0    # for the head, then again for body and answer

    def __post_init__(self):
        for name in ("max_header_bytes", "max_headers", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} = {getattr(self, name)!r} is invalid: expected a positive number")
