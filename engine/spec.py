"""Chain YAML v1: these pydantic models *are* the schema template authors write against.

``chains/chain.schema.json`` is generated from ``ChainSpec`` (``stagecast schema``); every field
has a description because editors show it on hover. Cross-stage rules (references, cycles, template
variables, model names) live in ``engine.validation``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field

__all__ = [
    "ChainSpec",
    "Defaults",
    "InputSpec",
    "InputStage",
    "LlmStage",
    "MapStage",
    "Message",
    "PromptParts",
    "RetrieveStage",
    "SplitStage",
    "STAGE_KINDS",
    "StageSpec",
    "TemplateStage",
]

ID_PATTERN = r"^[a-z0-9_-]+$"
STAGE_ID_PATTERN = r"^[a-z_][a-z0-9_]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputSpec(_Model):
    """One typed input of the chain, validated before the run starts."""

    type: Literal["string", "integer", "number", "boolean", "array", "object"] = Field(
        "string", description="The JSON type of the value."
    )
    title: str | None = Field(None, description="A short label for forms.")
    description: str | None = Field(None, description="What the value is for; shown in forms.")
    default: Any = Field(None, description="The value used when none is given; absent = required.")
    enum: list[Any] | None = Field(None, description="The only values allowed.")
    min_length: int | None = Field(None, ge=0, description="Strings: fewest characters.")
    max_length: int | None = Field(None, ge=0, description="Strings: most characters.")
    minimum: float | None = Field(None, description="Numbers: smallest value.")
    maximum: float | None = Field(None, description="Numbers: largest value.")
    multiline: bool = Field(
        False, description="Strings: a long text (forms show a text area and a file picker)."
    )
    examples: list[Any] | None = Field(None, description="Example values, for docs and forms.")


class Defaults(_Model):
    """Settings applied to every llm stage unless the stage overrides them."""

    model: str | None = Field(
        None, description="A model name from configs/models.yaml (default: `auto`)."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int | None = Field(
        None, gt=0, le=10_000_000, description="Most tokens a model may produce."
    )
    timeout: float | None = Field(
        None, gt=0, le=86_400, description="Seconds one stage attempt may take."
    )
    retries: int | None = Field(None, ge=0, le=10, description="Retries after a transient failure.")


class Message(_Model):
    """One chat message of a prompt."""

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="The message text (a template).")


class PromptParts(_Model):
    """A prompt as a system message and a user message."""

    system: str | None = Field(None, description="The system message (a template).")
    user: str = Field(description="The user message (a template).")


class _StageBase(_Model):
    id: str | None = Field(
        None,
        pattern=STAGE_ID_PATTERN,
        description=(
            "The stage id, unique in the chain: lowercase letters, digits and `_`, not starting "
            "with a digit. Required for top-level stages; optional inside a map's `stage`."
        ),
    )
    label: str | None = Field(None, description="What a UI shows for this stage.")
    weight: float = Field(
        1.0, gt=0, le=1_000_000, description="The stage's share of the run's progress bar."
    )
    when: str | None = Field(
        None,
        description="A template expression; when it is false the stage ends `skipped`.",
    )
    needs: list[str] = Field(
        default_factory=list,
        description="Stages that must end before this one, besides those its templates reference.",
    )
    timeout: float | None = Field(
        None, gt=0, le=86_400, description="Seconds one attempt may take."
    )
    retries: int | None = Field(
        None, ge=0, le=10, description="Retries after a transient failure (with backoff)."
    )


class LlmStage(_StageBase):
    """Render a prompt and call a model; tokens stream as they come."""

    kind: Literal["llm"] = Field(description="Calls a chat model.")
    prompt: str | PromptParts | list[Message] = Field(
        description=(
            "A string (the user message), `{system, user}`, or a list of `{role, content}` "
            "messages. Every text is a template."
        )
    )
    model: str | None = Field(None, description="A model name from configs/models.yaml.")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int | None = Field(
        None, gt=0, le=10_000_000, description="Most tokens the model may produce."
    )
    stream: bool = Field(
        True,
        description="Stream tokens as they come (false: no token events; the output comes on "
        "stage-end).",
    )
    output: Literal["text", "json"] = Field(
        "text", description="`json` parses the answer as JSON and validates it against `schema`."
    )
    schema_: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="A JSON Schema the JSON output must match (any schema, arrays included).",
    )


class TemplateStage(_StageBase):
    """Render text with no model call."""

    kind: Literal["template"] = Field(description="Renders `text`.")
    text: str = Field(description="The template to render.")


class SplitStage(_StageBase):
    """Split a text into chunks, preferring paragraph and sentence boundaries."""

    kind: Literal["split"] = Field(description="Splits `text` into chunks.")
    text: str = Field(description="The text to split (a template).")
    chunk_size: int = Field(2000, ge=50, le=1_000_000, description="Most characters in a chunk.")
    overlap: int = Field(
        0, ge=0, le=1_000_000, description="Characters shared by consecutive chunks."
    )
    sources: bool = Field(False, description="Emit a `source` event per chunk.")


class RetrieveStage(_StageBase):
    """Find the best passages for a query in a document collection."""

    kind: Literal["retrieve"] = Field(description="Retrieves passages and emits sources.")
    query: str = Field(description="What to search for (a template); an empty query finds nothing.")
    collection: str = Field(
        description=(
            "A name from configs/collections.yaml, or a folder of documents (.md, .txt, .pdf, "
            ".docx, .csv, .xlsx) relative to the chain file."
        )
    )
    top_k: int = Field(5, ge=1, le=100, description="How many passages to return at most.")
    min_score: float | None = Field(
        None, ge=0, description="Drop passages scoring below this (BM25 scores start at 0)."
    )


class InputStage(_StageBase):
    """Pause the run until a person answers."""

    kind: Literal["input"] = Field(description="Waits for a person's answer.")
    prompt: str = Field(description="What to ask (a template; Markdown).")
    schema_: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="A JSON Schema the answer must match (default: a string).",
    )
    default: Any = Field(
        None,
        description=(
            "The answer taken when `timeout` passes with no answer; without it the stage fails "
            "at the timeout."
        ),
    )

    @property
    def answer_schema(self) -> dict[str, Any]:
        """The schema answers are checked against (a string unless the stage says otherwise)."""
        return self.schema_ if self.schema_ is not None else {"type": "string"}

    @property
    def has_default(self) -> bool:
        return "default" in self.model_fields_set


class MapStage(_StageBase):
    """Run a nested stage (or a sequence of stages) once per item of a list, in parallel up to
    `concurrency`."""

    kind: Literal["map"] = Field(description="Fans out over `over`.")
    over: str = Field(description="A template whose value is a list, e.g. `{{ stages.x.output }}`.")
    as_: str = Field(
        "item", alias="as", pattern=STAGE_ID_PATTERN, description="The item's name in templates."
    )
    concurrency: int = Field(4, ge=1, le=64, description="Most items running at once.")
    stage: StageSpec | None = Field(
        None,
        description="The stage to run per item (`as`, `index` and `earlier` in scope).",
    )
    stages: list[StageSpec] | None = Field(
        None,
        min_length=1,
        max_length=50,
        description=(
            "Instead of `stage`: stages run one after another per item; each reads the ones "
            "before it as `stages.<id>.output`, and the item's output is `{id: output}`."
        ),
    )

    @property
    def item_stages(self) -> list[StageSpec]:
        """What runs per item: ``[stage]``, or the ``stages`` sequence."""
        if self.stages is not None:
            return list(self.stages)
        return [self.stage] if self.stage is not None else []


StageSpec = Annotated[
    LlmStage | MapStage | SplitStage | TemplateStage | RetrieveStage | InputStage,
    Discriminator("kind"),
]
MapStage.model_rebuild()

STAGE_KINDS: tuple[str, ...] = tuple(
    get_args(member.model_fields["kind"].annotation)[0]
    for member in get_args(get_args(StageSpec)[0])
)
"""Every stage ``kind``, in the union's order (derived from it: one list to keep current)."""


class ChainSpec(_Model):
    """A prompt chain: typed inputs, stages that form a DAG, and named outputs."""

    id: str | None = Field(
        None, pattern=ID_PATTERN, description="The chain id; defaults to the file stem."
    )
    title: str | None = Field(None, description="A human-readable name.")
    description: str | None = Field(None, description="What the chain does.")
    version: int | str | None = Field(1, description="The chain's own version.")
    inputs: dict[str, InputSpec] = Field(
        default_factory=dict, description="Typed inputs, validated before the run starts."
    )
    defaults: Defaults = Field(
        default_factory=Defaults, description="Applied to every llm stage unless it overrides."
    )
    stages: list[StageSpec] = Field(min_length=1, description="The stages, in reading order.")
    outputs: dict[str, Any] | None = Field(
        None,
        description=(
            "Named outputs, each a template (a whole `{{ expr }}` keeps its type). "
            "Without it the run's output is the last stage's output."
        ),
    )
