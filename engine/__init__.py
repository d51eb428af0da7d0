"""Stagecast's engine: YAML prompt chains run as a typed event stream.

The public surface::

    chain = load_chain("chains/advanced_summary.yaml")      # ChainSpecError lists every problem
    async for event in run_chain(chain, {"document": text}): # RunEvent, protocol v1
        print(event_to_json(event))

``ChainRun`` is the lower-level handle (sink callback, cancel, status) the HTTP API uses.
"""

from engine.chain import Chain
from engine.errors import (
    ChainError,
    ChainSpecError,
    InputError,
    ModelConfigError,
    Problem,
    StageError,
    TemplateError,
    TransientError,
)
from engine.events import RUN_EVENT, RunEvent, event_from_json, event_to_dict, event_to_json
from engine.inputs import inputs_json_schema, validate_inputs
from engine.loading import find_chain, load_chain
from engine.orchestrator import ChainRun, run_chain
from engine.providers import ModelRegistry, load_models_config

__all__ = [
    "RUN_EVENT",
    "Chain",
    "ChainError",
    "ChainRun",
    "ChainSpecError",
    "InputError",
    "ModelConfigError",
    "ModelRegistry",
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
