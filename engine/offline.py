"""The offline model: deterministic, no network, streams word by word.

It derives its text from the prompt, so outputs differ per input and read as clearly placeholder,
and for ``output: json`` stages it returns JSON valid against the stage's schema, so every chain
runs end to end with no API key. A prompt that lists numbered sources (lines starting ``[1] ``,
``[2] `` …, as a retrieve stage's output is usually shown) gets an answer quoting the first
sentence of the first two sources, each followed by its marker, so citations can be seen offline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

__all__ = ["OfflineChatModel", "Piece", "fake_json", "offline_text"]

_WORD = re.compile(r"[^\W\d_][\w'-]{3,}", re.UNICODE)
_TOKEN = re.compile(r"\S+\s*|\s+")
_SOURCE_LINE = re.compile(r"^[ \t]*\[(\d{1,3})\][ \t]+\S.*$", re.MULTILINE)
_SENTENCE = re.compile(r".+?(?:[.!?。？！](?=\s|$)|$)", re.DOTALL)


def _salient_words(text: str, limit: int) -> list[str]:
    seen: dict[str, None] = {}
    for word in _WORD.findall(text):
        key = word.lower()
        if key not in seen:
            seen[key] = None
            if len(seen) >= limit:
                break
    return list(seen)


def _message_text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(
        part if isinstance(part, str) else str(part.get("text", "")) for part in content
    )


def offline_text(messages: Sequence[BaseMessage], max_words: int = 60) -> str:
    """A deterministic placeholder answer built from the prompt's own words."""
    user = "\n".join(_message_text(m) for m in messages if m.type == "human") or "".join(
        _message_text(m) for m in messages
    )
    digest = hashlib.sha256(user.encode()).hexdigest()[:6]
    cited = _cited_answer(user)
    if cited is not None:
        return f"[offline {digest}] {cited}"
    words = _salient_words(user, max(8, max_words - 6))
    body = " ".join(words) if words else "nothing to work with"
    return f"[offline {digest}] {body}."


def _cited_answer(text: str, limit: int = 2) -> str | None:
    """The first sentence of each of the first ``limit`` numbered sources, with its marker."""
    found = list(_SOURCE_LINE.finditer(text))
    if not found:
        return None
    parts: list[str] = []
    for i, match in enumerate(found[:limit]):
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        lines = [
            line.strip()
            for line in text[match.end() : end].splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        # a statement, not the question a Q&A row starts with
        line = next(
            (x for x in lines if re.search(r"[.!。！]", x) and not x.rstrip().endswith("?")),
            lines[0] if lines else "",
        )
        sentence = _SENTENCE.match(line)
        quoted = (sentence.group(0) if sentence else line).strip()[:200]
        parts.append(f"{quoted} [{match.group(1)}]" if quoted else f"[{match.group(1)}]")
    return " ".join(parts)


def fake_json(schema: dict[str, Any] | None, words: list[str], name: str = "value") -> Any:
    """A value valid against ``schema``, filled with ``words`` so it reads as placeholder."""
    schema = schema or {}
    pool = words or ["offline"]

    def text(n: int, key: str) -> str:
        start = (sum(map(ord, key)) + n) % len(pool)
        return " ".join(pool[(start + i) % len(pool)] for i in range(min(6, len(pool))))

    counter = iter(range(1_000_000))

    def gen(s: dict[str, Any], key: str) -> Any:
        if "const" in s:
            return s["const"]
        if s.get("enum"):
            return s["enum"][0]
        for combo in ("anyOf", "oneOf", "allOf"):
            if s.get(combo):
                return gen(s[combo][0], key)
        kind = s.get("type", "object" if "properties" in s else "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            props: dict[str, Any] = s.get("properties", {})
            return {k: gen(v, k) for k, v in props.items()}
        if kind == "array":
            low = int(s.get("minItems", 0))
            high = int(s.get("maxItems", max(low, 3)))
            count = max(low, min(3, high))
            return [gen(s.get("items", {}), key) for _ in range(count)]
        if kind == "integer" or kind == "number":
            low_n = s.get(
                "minimum", s.get("exclusiveMinimum", 0) + 1 if "exclusiveMinimum" in s else 1
            )
            high_n = s.get("maximum")
            value = low_n if high_n is None else min(max(low_n, 1), high_n)
            return int(value) if kind == "integer" else float(value)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        value_s = f"(offline {key}) {text(next(counter), key)}"
        if "maxLength" in s:
            value_s = value_s[: int(s["maxLength"])]
        if "minLength" in s and len(value_s) < int(s["minLength"]):
            value_s = value_s.ljust(int(s["minLength"]), ".")
        return value_s

    return gen(schema, name)


class OfflineChatModel(BaseChatModel):
    """A chat model that needs no network: deterministic placeholder text, streamed per word."""

    delay_ms: float = 0.0
    """Wait this long before each token (to watch progress)."""
    max_words: int = 60
    """About how many words a text answer has."""
    json_schema: dict[str, Any] | None = None
    """When set, answer with JSON valid against this schema (set per call by the orchestrator)."""
    json_mode: bool = False
    """Answer with JSON (an object when no schema is set)."""

    @property
    def _llm_type(self) -> str:
        return "stagecast-offline"

    def answer(self, messages: Sequence[BaseMessage]) -> str:
        if self.json_mode or self.json_schema is not None:
            # the user's words first: a long shared system prompt must not hide the item
            ordered = sorted(messages, key=lambda m: m.type != "human")
            words = _salient_words(" ".join(_message_text(m) for m in ordered), 40)
            return json.dumps(fake_json(self.json_schema, words), ensure_ascii=False)
        return offline_text(messages, self.max_words)

    def _usage(self, messages: Sequence[BaseMessage], output_tokens: int) -> UsageMetadata:
        prompt_tokens = sum(len(_message_text(m).split()) for m in messages)
        return UsageMetadata(
            input_tokens=prompt_tokens,
            output_tokens=output_tokens,
            total_tokens=prompt_tokens + output_tokens,
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        text = self.answer(messages)
        usage = self._usage(messages, len(_TOKEN.findall(text)))
        message = AIMessage(content=text, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        text = self.answer(messages)
        tokens = _TOKEN.findall(text)
        for token in tokens:
            yield ChatGenerationChunk(message=AIMessageChunk(content=token))
        usage = self._usage(messages, len(tokens))
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for piece in self.stream_pieces(messages):
            chunk = AIMessageChunk(content=piece.content, usage_metadata=piece.usage_metadata)
            yield ChatGenerationChunk(message=chunk)

    async def stream_pieces(self, messages: Sequence[BaseMessage]) -> AsyncGenerator[Piece, None]:
        """The answer word by word, then a last piece with the usage.

        The orchestrator reads this directly instead of ``astream()``: the offline model is the
        embedded default (demos, dry runs, load tests), and LangChain's per-chunk callback and
        message-merging layer would cost more than the model itself.
        """
        text = self.answer(messages)
        tokens = _TOKEN.findall(text)
        delay = self.delay_ms / 1000
        for token in tokens:
            if delay:
                await asyncio.sleep(delay)
            yield Piece(token)
        yield Piece("", self._usage(messages, len(tokens)))


@dataclass(slots=True)
class Piece:
    """One streamed piece: what ``astream()`` chunks carry, without the LangChain objects."""

    content: str
    usage_metadata: UsageMetadata | None = None
