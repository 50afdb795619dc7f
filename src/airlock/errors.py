"""The exception tree (``domain.IllegalTransition`` lives in the pure domain and maps to 409).

The tree. ``api/`` maps each class to one HTTP status and error code.

    AirlockError                       500 internal
    ├── InvalidInput                   400 / 422 bad_request: the caller sent something wrong
    ├── Unauthorized                   401 unauthorized: no or bad token
    ├── Forbidden                      403 forbidden: a user token naming another user
    ├── NotFound                       404 *_not_found: missing, or someone else's
    ├── Conflict                       409 conflict: not allowed in the current state
    ├── TooManyRequests                429 a per-user quota or a per-client rate limit
    ├── Unavailable                    503 unavailable: a dependency is down or at capacity
    │   └── RuntimeFailure             the VM runtime failed to do what was asked
    └── CredentialError                422 invalid_credentials: captured files are unusable
"""

from __future__ import annotations


class AirlockError(Exception):
    """Base of every error Airlock raises on purpose."""

    status = 500
    code = "internal"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        # Seconds until asking again is worth it: the answer's ``Retry-After`` header.
        self.retry_after = retry_after


class InvalidInput(AirlockError):
    status = 400
    code = "bad_request"


class Unauthorized(AirlockError):
    status = 401
    code = "unauthorized"


class Forbidden(AirlockError):
    status = 403
    code = "forbidden"


class NotFound(AirlockError):
    status = 404
    code = "not_found"


class Conflict(AirlockError):
    status = 409
    code = "conflict"


class TooManyRequests(AirlockError):
    status = 429
    code = "too_many_requests"


class Unavailable(AirlockError):
    status = 503
    code = "unavailable"


class RuntimeFailure(Unavailable):
    code = "runtime_failure"


class CredentialError(AirlockError):
    status = 422
    code = "invalid_credentials"
