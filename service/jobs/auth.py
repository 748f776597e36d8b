"""API keys: bearer tokens checked against the sha256 digests of the configuration.

Only digests are held; a request's token is hashed and compared in constant time with
every configured digest. The key's *name* (never the token) identifies the owner of jobs.
"""

from __future__ import annotations

import hmac

from posezoo.errors import PosezooError

from ..config import hash_api_key

ANONYMOUS = "anonymous"


class AuthError(PosezooError):
    """Missing or wrong API key (HTTP 401)."""

    status = 401

    def __init__(self, message: str, code: str = "unauthorized"):
        super().__init__(message)
        self.code = code


class ApiKeys:
    def __init__(self, digests: dict[str, str], allow_anonymous: bool = False):
        self._digests = [(name, bytes.fromhex(d)) for name, d in digests.items()]
        self.allow_anonymous = allow_anonymous

    def owner(self, authorization: str | None) -> str:
        """The key name for an ``Authorization`` header value; raises :class:`AuthError`."""
        if not authorization:
            if self.allow_anonymous:
                return ANONYMOUS
            raise AuthError("missing API key: send it as 'Authorization: Bearer <key>'", "missing_api_key")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'", "invalid_api_key")
        digest = bytes.fromhex(hash_api_key(token))
        found = None
        for name, d in self._digests:  # no early exit: constant time over the keys
            if hmac.compare_digest(d, digest):
                found = name
        if found is None:
            raise AuthError("invalid API key", "invalid_api_key")
        return found
