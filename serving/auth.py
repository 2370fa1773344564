"""An optional bearer token: with one, every route but /healthz needs `Authorization: Bearer <token>`.

The token is SLC_API_TOKEN from the environment or, without it, the first line of a file
(params.yaml's `serving.token_file`, `slc serve --token-file`); the environment wins, as it does
over params.yaml elsewhere. /healthz stays open for load balancers' probes and says nothing but
"ok" and the default run's name. A refusal is a 401 that says only that a token is needed.
"""
from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from fastapi.responses import JSONResponse

from serving.errors import SetupError

ENV = "SLC_API_TOKEN"
OPEN_PATHS = frozenset({"/healthz"})


def read_token(token_file: str | Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token to require, or None to serve without one; an empty or unreadable one is an error,
    never a silent "no token"."""
    if ENV in environ:
        token, origin = environ[ENV].strip(), f"{ENV} in the environment"
    elif token_file is not None:
        try:
            lines = Path(token_file).read_text().splitlines()
        except OSError as error:
            raise SetupError(f"cannot read the token file {token_file}: {error.strerror}; write the token "
                             f"into it, or set serving.token_file to null to serve without a token") from None
        token, origin = (lines[0].strip() if lines else ""), f"the token file {token_file}"
    else:
        return None
    if not token:
        raise SetupError(f"{origin} is empty: put a token there (e.g. `python -c 'import secrets; "
                         f"print(secrets.token_urlsafe(32))'`), or unset it to serve without a token")
    return token


class BearerToken:
    """ASGI middleware: answers 401 before anything else is read when a request lacks the token."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].removeprefix(scope.get("root_path", "")) not in OPEN_PATHS:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)):
                response = JSONResponse({"detail": "this server needs a bearer token: send `Authorization: Bearer "
                                                   "<token>`"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
