"""Typed errors. Each carries its HTTP status, OpenAI error type/code and retry advice.

They are turned into responses in exactly one place (`activator.edge.responses`).
`BackendError` is the exception: it never reaches a client as such (a model turns a
failed start into StartFailed); it lives here so that every layer can name it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ActivatorError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    # The connection is closed after the answer: the rest of the request body was never
    # read, so the connection is in no state to carry another request.
    closes_connection: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
            # Lets clients and gateways tell our errors from the engine's.
            "source": "activator",
        }
        error.update(self.extra)
        return {"error": error}

    def headers(self) -> dict[str, str]:
        """Headers this error adds to its response (beyond Content-Type and Retry-After)."""
        return {}


class InternalError(ActivatorError):
    """A bug: an exception nothing expected. Logged with its traceback where it is caught."""


class BadRequest(ActivatorError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLarge(ActivatorError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    closes_connection = True


class RequestTimeout(ActivatorError):
    """The request body did not arrive within `server.body_timeout`."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    closes_connection = True


class TooManyBodies(ActivatorError):
    """One client address has `server.max_body_reads_per_client` bodies arriving already."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_request_bodies"
    retryable = True
    closes_connection = True


class UnsupportedEncoding(ActivatorError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class MethodNotAllowed(ActivatorError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


class Unauthorized(ActivatorError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ActivatorError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ActivatorError):
    """The request cannot be carried out in the resource's current state (admin API)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class QueueFull(ActivatorError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retryable = True


class ModelUnavailable(ActivatorError):
    """The model could not be made ready for this request (start failed, timed out...)."""

    status = 503
    type = "server_error"
    code = "model_unavailable"
    retryable = True


class StartFailed(ModelUnavailable):
    code = "model_start_failed"


class HoldTimeout(ModelUnavailable):
    code = "model_start_timeout"


class ShuttingDown(ModelUnavailable):
    code = "shutting_down"


class ModelRemoved(ModelUnavailable):
    """A config reload removed the model while the request was held for it."""

    code = "model_removed"
    retryable = False


class ConfigInvalid(BadRequest):
    """POST /admin/reload: the new config file is invalid (`extra` lists its problems)."""

    code = "invalid_config"


class ReloadRefused(Conflict):
    """POST /admin/reload: the new config is valid but cannot apply without a restart."""

    code = "reload_refused"


class UpstreamError(ActivatorError):
    status = 502
    type = "server_error"
    code = "upstream_connection_error"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class AdapterLoadFailed(ActivatorError):
    """A LoRA adapter could not be loaded into its running base (the engine refused it:
    a bad path, a rank above --max-lora-rank; or it did not answer in time). The base
    stays up for its other requests."""

    status = 502
    type = "server_error"
    code = "adapter_load_failed"


class BackendError(Exception):
    """A backend operation failed for a reason a person should read (RBAC, bad spec...)."""
