"""Stagecast's engine: YAML prompt chains run as a typed event stream.

The public surface::

    chain = load_chain("chains/advanced_summary.yaml")      # ChainSpecError lists every problem
    async for event in run_chain(chain, {"document": text}): # RunEvent, protocol v1
        print(event_to_json(event))

``ChainRun`` is the lower-level handle (sink callback, cancel, status) the HTTP API uses.
``run_chain(chain, inputs, retrievers={"kb": retriever})`` plugs a LangChain retriever or vector
store into the ``retrieve`` stages whose ``collection`` is ``kb``.
"""

from stagecast.engine.asking import AnswerRefused, NotWaiting, PendingInput
from stagecast.engine.chain import Chain
from stagecast.engine.errors import (
    ChainError,
    ChainSpecError,
    CollectionError,
    InputError,
    ModelConfigError,
    Problem,
    StageError,
    TemplateError,
    TransientError,
)
from stagecast.engine.events import (
    RUN_EVENT,
    RunEvent,
    event_from_json,
    event_to_dict,
    event_to_json,
)
from stagecast.engine.inputs import inputs_json_schema, validate_inputs
from stagecast.engine.loading import find_chain, load_chain
from stagecast.engine.model_config import load_models_config
from stagecast.engine.orchestrator import ChainRun, run_chain
from stagecast.engine.providers import ModelRegistry

__all__ = [
    "RUN_EVENT",
    "AnswerRefused",
    "Chain",
    "ChainError",
    "ChainRun",
    "ChainSpecError",
    "CollectionError",
    "InputError",
    "ModelConfigError",
    "ModelRegistry",
    "NotWaiting",
    "PendingInput",
    "Problem",
    "RunEvent",
    "StageError",
    "TemplateError",
    "TransientError",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
    "find_chain",
    "inputs_json_schema",
    "load_chain",
    "load_models_config",
    "run_chain",
    "validate_inputs",
]
