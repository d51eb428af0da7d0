"""Provider exceptions -> StageError (fails the stage) or TransientError (worth a retry).

Retries are owned in one place: the OpenAI client is built with ``max_retries=0``, so a fault
surfaces at once as an exception and ``classify_error`` decides. Messages name the models.yaml
entry and what to fix, and never a secret: text a server sends back is scrubbed of the key
(OpenAI's own 401 echoes part of it) and of anything shaped like one.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from email.utils import parsedate_to_datetime
from typing import Any

from stagecast.engine.errors import StageError, TransientError

__all__ = ["EXCERPT_CHARS", "body_excerpt", "classify_error", "excerpt", "scrub"]

EXCERPT_CHARS = 300
"""The most characters of a server's error body that a message quotes."""

_KEYLIKE = re.compile(r"\b(?:sk|rk|pk|key)-[A-Za-z0-9_\-*]{6,}")
_LABELLED = re.compile(
    r"(?i)\b(bearer|authorization|api[_-]?key|access[_-]?token|token|secret|password)"
    r"(\\?[\"']?\s*[:=]\s*\\?[\"']?\s*|\s+)(?:bearer\s+)?[^\s\"'\\&,;<>]{6,}"
)
_HTML_DROP = re.compile(r"(?is)<(head|script|style)\b.*?</\1\s*>|<!--.*?-->")
_HTML_TAG = re.compile(r"<[^>]*>")


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` without the given secrets, anything shaped like an API key, and the value of
    anything labelled as a credential (``Bearer …``, ``api_key=…``, ``"token": "…"``)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _KEYLIKE.sub("***", text)
    return _LABELLED.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` on one line (runs of white space as one space), cut to ``limit`` characters
    with ``…`` when longer."""
    flat = " ".join(text[: limit * 8].split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def body_excerpt(body: Any, secrets: Iterable[str] = ()) -> str:
    """What a server's error body says, scrubbed and bounded: the text of an HTML page, a JSON
    body compactly, plain text as is; ``(empty body)`` for nothing."""
    if body is None or body == "":
        return "(empty body)"
    if isinstance(body, (dict, list)):
        text = json.dumps(body, ensure_ascii=False, separators=(", ", ": "), default=str)
    else:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        if "<" in text[:200] and _HTML_TAG.search(text[:2000]):
            text = _HTML_TAG.sub(" ", _HTML_DROP.sub(" ", text[:50_000]))
    text = scrub(text[:50_000], secrets)  # before the cut: a secret is never half-quoted
    return excerpt(text) or "(empty body)"


def _causes(exc: BaseException) -> list[str]:
    names: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    return names


def classify_error(
    exc: BaseException,
    model_name: str = "",
    *,
    model: str | None = None,
    secrets: Iterable[str] = (),
    models_file: str = "configs/models.yaml",
) -> StageError:
    """A provider exception as a StageError: TransientError when worth retrying.

    Args:
        exc: what the model call raised.
        model_name: the configs/models.yaml entry, named in the message.
        model: the provider's model name (``model:`` of the entry), named for a 404.
        secrets: strings scrubbed from any text the server sent back (the API key).
        models_file: the models file the entry is in (``ModelsConfig.source``), named in fixes.
    """
    if isinstance(exc, StageError):
        return exc
    secrets = list(secrets)
    entry = f"model {model_name!r}" if model_name else "the model"
    where = f"{entry}: "
    fix_in = f" of {model_name!r} in {models_file}" if model_name else ""
    causes = _causes(exc)
    try:
        import openai
    except ImportError:  # pragma: no cover - langchain-openai depends on it
        openai = None  # type: ignore[assignment]
    if openai is not None and isinstance(exc, openai.OpenAIError):
        if isinstance(exc, openai.APITimeoutError):
            if "ConnectTimeout" in causes:
                return TransientError(
                    f"{where}timed out connecting to {_request_host(exc)} "
                    f"(connect_timeout{fix_in})",
                    type="timeout",
                )
            return TransientError(
                f"{where}the server sent nothing for too long (read_timeout{fix_in})",
                type="timeout",
            )
        if isinstance(exc, openai.APIConnectionError):
            if "ConnectError" in causes:
                return TransientError(
                    f"{where}cannot connect to {_request_host(exc)}: is the server running? "
                    f"(base_url{fix_in})",
                    type="connection_error",
                )
            return TransientError(
                f"{where}the connection to {_request_host(exc)} dropped mid-answer",
                type="connection_error",
            )
        if isinstance(exc, openai.APIStatusError):
            return _status_error(exc, where, fix_in, model, secrets)
        if isinstance(exc, openai.LengthFinishReasonError):
            return StageError(
                f"{where}the answer hit max_tokens before the JSON was complete: raise "
                f"max_tokens (of the stage, the chain's defaults, or{fix_in or ' the entry'})",
                type="max_tokens",
            )
        if isinstance(exc, openai.APIError):  # an error event inside the stream
            detail = excerpt(scrub(str(exc.message), secrets))
            return TransientError(
                f"{where}the server reported an error: {detail}", type="server_error"
            )
    if isinstance(exc, json.JSONDecodeError):
        return TransientError(
            f"{where}the server sent a malformed stream chunk ({exc.msg})", type="malformed_chunk"
        )
    if isinstance(exc, TimeoutError):
        return TransientError(f"{where}timed out waiting for the next chunk", type="timeout")
    if isinstance(exc, ConnectionError):
        return TransientError(f"{where}{type(exc).__name__}", type="connection_error")
    detail = excerpt(scrub(str(exc), secrets))
    return StageError(f"{where}{type(exc).__name__}: {detail}", type="model_error")


def _status_error(
    exc: Any, where: str, fix_in: str, model: str | None, secrets: list[str]
) -> StageError:
    status = int(exc.status_code)
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    code = str(error.get("code") or "") if isinstance(error, dict) else ""
    said = error.get("message") if isinstance(error, dict) else None
    if isinstance(said, str) and said.strip():
        message = excerpt(scrub(said, secrets))
    else:  # no message field (a proxy's HTML page, plain text, other JSON): quote the body
        message = f"the body says: {body_excerpt(exc.body, secrets)}"
    if status == 401:
        return StageError(
            f"{where}the server refused the API key (401): check the key in the variable "
            f"named by api_key_env{fix_in}",
            type="auth_error",
        )
    if status == 403:
        return StageError(
            f"{where}the API key may not use this model (403): check the key's project "
            f"and permissions, or pick another model{fix_in}",
            type="auth_error",
        )
    if status == 429 and code == "insufficient_quota":
        return StageError(
            f"{where}the account's quota is used up (429 insufficient_quota): check billing",
            type="quota_exceeded",
        )
    if status == 429:
        return TransientError(
            f"{where}rate limited (429)", type="rate_limited", retry_after=_retry_after(exc)
        )
    if status in (408, 409) or status >= 500:
        return TransientError(
            f"{where}server error ({status}): {message}",
            type="server_error",
            retry_after=_retry_after(exc),
        )
    if status == 404:
        if "model" in message.lower() or code == "model_not_found":
            name = f" {model!r}" if model else ""
            return StageError(
                f"{where}the server has no model{name} (404): fix model{fix_in}, or load "
                "it into the server (e.g. ollama pull)",
                type="model_not_found",
            )
        return StageError(
            f"{where}no chat completions endpoint at {_request_host(exc)} (404): check "
            f"base_url{fix_in} (it usually ends in /v1)",
            type="model_error",
        )
    hint = ""
    lowered = message.lower()
    if "response_format" in lowered or "json_schema" in lowered:
        hint = f"; if the server lacks JSON mode, set json_mode: json_object or off{fix_in}"
    elif "context" in lowered and ("length" in lowered or "window" in lowered):
        hint = "; shorten the input or use a model with a larger context"
    return StageError(f"{where}request refused ({status}): {message}{hint}", type="model_error")


def _request_host(exc: Any) -> str:
    try:
        url = exc.request.url
        return f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")
    except AttributeError:
        return "the server"


def _retry_after(exc: Any) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, then ``Retry-After``."""
    try:
        headers = exc.response.headers
    except AttributeError:
        return None
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return max(0.0, float(millis) / 1000)
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None
