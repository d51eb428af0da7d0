"""The JSON Schema of the HTTP API's request and response bodies (committed as
api/schema/http-bodies.json; ``stagecast schema --http`` prints it; a test keeps it current).

Together with the event schema (api/schema/run-events.json) it is what api/static/stagecast.d.ts,
the TypeScript declarations of the browser client, is generated from.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from stagecast.api.errors import ErrorResponse
from stagecast.api.routes import (
    AnswerAccepted,
    CancelAccepted,
    ChainDetail,
    ChainList,
    InputAnswer,
    ModelList,
    RecordingList,
    ReplayRequest,
    RunCreated,
    RunRequest,
    RunStatusModel,
)

__all__ = ["rest_json_schema", "rest_json_schema_text"]

Mode = Literal["validation", "serialization"]
_BODIES: list[tuple[type[BaseModel], Mode]] = [
    (RunRequest, "validation"),
    (ReplayRequest, "validation"),
    (InputAnswer, "validation"),
    (RunCreated, "serialization"),
    (RunStatusModel, "serialization"),
    (CancelAccepted, "serialization"),
    (AnswerAccepted, "serialization"),
    (ChainList, "serialization"),
    (ChainDetail, "serialization"),
    (ModelList, "serialization"),
    (RecordingList, "serialization"),
    (ErrorResponse, "serialization"),
]


def rest_json_schema() -> dict[str, Any]:
    """Every request and response body as a ``$defs`` entry (requests as sent, responses as
    received)."""
    _, schema = models_json_schema(_BODIES, title="Stagecast HTTP API v1 bodies")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "stagecast/http-bodies/v1",
        "description": "Request bodies (RunRequest, ReplayRequest, InputAnswer) and response "
        "bodies of the HTTP API v1; the event stream's events are in run-events.json.",
        **schema,
    }


def rest_json_schema_text() -> str:
    """``rest_json_schema()`` exactly as committed."""
    return json.dumps(rest_json_schema(), indent=2, ensure_ascii=False) + "\n"
