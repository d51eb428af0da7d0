"""Test doubles: a chat model that streams exactly the chunks a test scripts."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import PrivateAttr

from stagecast.engine.offline import OfflineChatModel, Piece

Step = str | float | BaseException
"""A str is streamed as one chunk; a float sleeps that many seconds; an exception is raised."""


class ScriptedChatModel(BaseChatModel):
    """Each call plays the next script; ``calls`` records prompts, ``closed`` finished streams.

    With ``cycle=True`` the last script repeats forever (for map stages).
    """

    scripts: list[list[Step]]
    cycle: bool = False
    usage: tuple[int, int] | None = None
    _calls: list[list[BaseMessage]] = PrivateAttr(default_factory=list)
    _closed: list[int] = PrivateAttr(default_factory=list)
    _completed: list[int] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    @property
    def calls(self) -> list[list[BaseMessage]]:
        return self._calls

    @property
    def closed(self) -> list[int]:
        """Indices of calls whose stream was closed before it finished (cancel, error)."""
        return self._closed

    @property
    def completed(self) -> list[int]:
        return self._completed

    def _script(self, messages: list[BaseMessage]) -> tuple[int, list[Step]]:
        index = len(self._calls)
        self._calls.append(messages)
        if index < len(self.scripts):
            return index, self.scripts[index]
        if self.cycle:
            return index, self.scripts[-1]
        raise AssertionError(f"no script for call {index + 1}")

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        _, script = self._script(messages)
        text = "".join(s for s in script if isinstance(s, str))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        raise AssertionError("the engine must use the async stream")

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        index, script = self._script(messages)
        finished = False
        try:
            for step in script:
                if isinstance(step, BaseException):
                    raise step
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    continue
                yield ChatGenerationChunk(message=AIMessageChunk(content=step))
            if self.usage is not None:
                meta = {
                    "input_tokens": self.usage[0],
                    "output_tokens": self.usage[1],
                    "total_tokens": sum(self.usage),
                }
                yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=meta))
            finished = True
            self._completed.append(index)
        finally:
            if not finished:
                self._closed.append(index)


def fmt(event: Any) -> str:
    """A short readable line per event, for exact-sequence assertions."""
    where = ""
    if event.path is not None:
        where = event.stage if len(event.path) == 1 else f"{event.stage}[{event.path[1]}]"
        where += "".join(f".{p}" for p in event.path[2:])
        if event.attempt and event.attempt > 1:
            where += f"#{event.attempt}"
    kind = event.type
    if kind == "run-start":
        return "run-start"
    if kind == "stage-start":
        return f"stage-start {where}"
    if kind == "token":
        return f"token {where} {event.text!r}"
    if kind == "source":
        return f"source {where} {event.source.id}"
    if kind == "stage-progress":
        return f"stage-progress {where} {event.completed}/{event.total}"
    if kind == "stage-retry":
        return f"stage-retry {where} {event.error.type}"
    if kind == "stage-end":
        return f"stage-end {where} {event.status}"
    if kind == "input-required":
        return f"input-required {where} {event.prompt!r}"
    if kind == "run-end":
        return f"run-end {event.status}"
    return f"{kind} {where}"


class CountingOfflineModel(OfflineChatModel):
    """The offline model, whose text answers depend on the whole prompt (system included), and
    which logs every call it gets: ``log`` (a shared list) gets the prompt text of each call."""

    log: Any = None

    def answer(self, messages: Sequence[BaseMessage]) -> str:
        text = super().answer(messages)
        if self.json_mode or self.json_schema is not None:
            return text
        prompt = "\n".join(str(m.content) for m in messages)
        return f"[{hashlib.sha256(prompt.encode()).hexdigest()[:8]}] {text}"

    async def stream_pieces(self, messages: Sequence[BaseMessage]) -> AsyncGenerator[Piece, None]:
        if self.log is not None:
            self.log.append("\n".join(str(m.content) for m in messages))
        async for piece in super().stream_pieces(messages):
            yield piece
