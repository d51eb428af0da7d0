"""Every error a client sees has one shape: ``{"error": {"code", "message", "details"}}``.

``code`` is a stable machine-readable string, ``message`` a sentence for people, ``details`` an
object (``{"fields": {"inputs.document": "required"}}`` for validation errors, else often ``{}``).
No traceback ever reaches a client: unexpected exceptions become a 500 ``internal`` error and are
logged on the server.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from stagecast.api.eventlog import EventLogUnavailable

__all__ = [
    "ApiError",
    "ErrorBody",
    "ErrorResponse",
    "TextSafeJSONResponse",
    "error_response",
    "install_error_handlers",
]

logger = logging.getLogger("stagecast.api")


class TextSafeJSONResponse(JSONResponse):
    """JSON as UTF-8, except that text which is not valid UTF-8 (a lone surrogate from a JSON
    escape in a request, or from a model) goes out as its ``\\udXXX`` escape instead of
    failing the response."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            return text.encode("utf-8", "backslashreplace")


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable kind, e.g. `unknown_run`.")
    message: str = Field(description="What went wrong, for people.")
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="More data; validation errors put `fields` here: field path -> problem.",
    )


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorBody


class ApiError(Exception):
    """An error with its HTTP status, raised by routes and turned into the JSON shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        self.headers = headers


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return TextSafeJSONResponse(body, status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    """A field path in the same scheme as input errors: ``inputs.n``, ``chain``, ``[1]``."""
    out = ""
    parts = list(loc)
    if parts[:1] == ["body"]:
        parts = parts[1:]
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # the shared event log or run queue (Redis) cannot be reached: retry, never a 500
        return error_response(503, "event_log_unavailable", str(exc), headers={"Retry-After": "1"})

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if (
            content_type
            and content_type != "application/json"
            and not content_type.endswith("+json")
        ):
            if any(e.get("loc", ())[:1] == ("body",) for e in errors):
                return error_response(
                    415,
                    "unsupported_media_type",
                    f"the body must be JSON (Content-Type: application/json), not {content_type}",
                )
        for error in errors:
            if error.get("type") == "json_invalid":
                where = error.get("loc", ())[-1]
                detail = (error.get("ctx") or {}).get("error", "")
                message = f"the request body is not valid JSON: {detail} (at character {where})"
                return error_response(
                    422, "invalid_request", message, {"fields": {"(body)": message}}
                )
        fields: dict[str, str] = {}
        for error in errors:
            fields.setdefault(_loc(error.get("loc", ())) or "(request)", str(error.get("msg")))
        message = "; ".join(f"{k}: {v}" for k, v in fields.items())
        return error_response(
            422, "invalid_request", f"the request is invalid: {message}", {"fields": fields}
        )

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # e.g. nested deeper than the JSON parser goes: the same answer as any bad JSON
            message = "the request body is not valid JSON (or is nested too deeply to read)"
            return error_response(422, "invalid_request", message, {"fields": {"(body)": message}})
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, code, message, headers=headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error (logged on the server)")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(EventLogUnavailable, store_unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
