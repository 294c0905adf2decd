"""
A served chat model: any server that speaks the OpenAI chat-completions API (vLLM,
Ollama, a llama.cpp server, ``transformers serve``, OpenAI itself).

One turn is one ``POST {endpoint}/chat/completions`` (not streamed) with the
conversation, the registry's tools as ``tools`` and ``temperature: 0`` unless
sampling is asked for. The turn carries the whole response: the agent hands it to
callward's parser, which reads the ``tool_calls`` and any calls left in the text with
its own rules (a response cut off by ``finish_reason: "length"`` never runs).

What is recorded of a turn (``ModelTurn``, then ``model.turn``):

- ``prompt_sha256``: SHA-256 of the RFC 8785 canonical JSON of
  ``{"messages": [...], "tools": [...]}`` exactly as sent.
- ``output_sha256``: SHA-256 of the canonical JSON of the response's
  ``choices[0].message``.
- ``served``: the endpoint, the requested model, the model id the server reports,
  the finish reason, the server's response id and token usage, and
  ``weights: "served: no digest"``: callward never sees a served model's weights, so
  its ``digest`` is None.

Invariants:

- The API key is read from its environment variable (``api_key_env``) at each
  request and sent only as ``Authorization: Bearer``. It is never logged, never in a
  turn, a record or an error message; a server's error body (which may echo it) is
  never read into one. Environment proxies and ``.netrc`` are not used
  (``trust_env=False``) and redirects are not followed, so the key goes to the
  configured endpoint only.
- A turn that is not a well-formed chat completion raises ``ModelEndpointFailed``
  (kind ``model_unavailable``) with its reason: ``timeout``, ``connection_failed``,
  ``http_status``, ``malformed_response`` (not JSON, not an object, no choices,
  wrong types, neither text nor calls, larger than ``MAX_RESPONSE_BYTES``) or
  ``no_api_key``. Never an empty answer in its place.
- The constructor does no I/O.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final, cast
from urllib.parse import urlsplit

import httpx2
import structlog

from callward.core._canonical import (
    CanonicalizationError,
    JSONValue,
    Sha256Hex,
    canonical_bytes,
    sha256_hex,
    strict_loads,
)
from callward.core.errors import ConfigurationError, ModelEndpointFailed
from callward.core.models._chat import ChatMessage, ChatModel, GenerationConfig, ModelTurn, ToolRole

log = structlog.get_logger()

MAX_RESPONSE_BYTES: Final = 8 * 1024 * 1024
DEFAULT_TIMEOUT_SECONDS: Final = 120.0
NO_DIGEST: Final = "served: no digest"
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def check_endpoint(endpoint: str, *, api_key_env: str | None) -> str:
    """
    The endpoint's base URL, checked: http(s), a host, no credentials, query or
    fragment in it; an API key goes over https, or plain http to loopback only.

    Raises:
        ConfigurationError: The URL is not one callward sends a conversation to.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError("model.endpoint must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError("model.endpoint must not carry credentials; "
                                 "name the API key's variable in model.api_key_env")
    if parts.query or parts.fragment:
        raise ConfigurationError("model.endpoint must not carry a query or fragment")
    loopback = parts.hostname in _LOOPBACK or parts.hostname.startswith("127.")
    if api_key_env and parts.scheme == "http" and not loopback:
        raise ConfigurationError("model.endpoint is plain http to another host: the API key "
                                 "would cross the network in clear; use https")
    return endpoint.rstrip("/")


@dataclass
class EndpointChatModel:
    """
    A chat model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    Attributes:
        endpoint: The base URL (``http://127.0.0.1:8000/v1``); ``/chat/completions``
            is added.
        name: The model the request names (``model``).
        api_key_env: The environment variable holding the API key; None: no key sent.
        timeout_seconds: For the whole request (connect, send, the server's
            generation, read).
        tool_role: ``tool``: results go back as ``tool`` messages paired by
            ``tool_call_id``; ``user``: folded into a user turn.
    """

    endpoint: str
    name: str
    api_key_env: str | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tool_role: ToolRole = "tool"
    _client: httpx2.Client | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.endpoint = check_endpoint(self.endpoint, api_key_env=self.api_key_env)
        if not self.name:
            raise ConfigurationError("model.name is required with model.endpoint")
        if not 0 < self.timeout_seconds <= 3600:
            raise ConfigurationError("model.timeout_seconds must be in (0, 3600]")

    @property
    def model_id(self) -> str:
        return self.name

    @property
    def digest(self) -> Sha256Hex | None:
        """None: a served model's weights are not seen, so there is no digest to record."""
        return None

    @property
    def url(self) -> str:
        return f"{self.endpoint}/chat/completions"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> EndpointChatModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one turn -------------------------------------------------------------

    def request_body(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, JSONValue]],
        *,
        require_call: bool = False,
    ) -> dict[str, JSONValue]:
        """
        The JSON body of the request for this conversation (no key in it); a turn that
        must be a call asks for ``tool_choice: "required"``.
        """
        body: dict[str, JSONValue] = {
            "model": self.name,
            "messages": [wire_message(message) for message in messages],
            "max_tokens": self.generation.max_new_tokens,
            "temperature": self.generation.temperature if self.generation.do_sample else 0,
            "stream": False,
        }
        if tools:
            body["tools"] = [dict(spec) for spec in tools]
            if require_call:
                body["tool_choice"] = "required"
        return body

    def generate(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, JSONValue]],
        *,
        require_call: bool = False,
    ) -> ModelTurn:
        """
        One turn from the server.

        Raises:
            ModelEndpointFailed: No well-formed chat completion came back (see the module).
        """
        started = time.perf_counter()
        body = self.request_body(messages, tools, require_call=require_call)
        prompt_sha256 = sha256_hex(canonical_bytes(
            {"messages": body["messages"], "tools": body.get("tools", [])}))
        payload = self._post(body)
        message, choice = self._message_of(payload)
        try:
            output_sha256 = sha256_hex(canonical_bytes(message))
        except CanonicalizationError as exc:
            raise self._malformed("the response's message is not I-JSON") from exc
        usage = _usage(payload.get("usage"), self._malformed)
        content = message.get("content")
        text = content.strip() if isinstance(content, str) else ""
        duration = time.perf_counter() - started
        served: dict[str, JSONValue] = {
            "endpoint": self.endpoint,
            "requested": self.name,
            "reported": payload.get("model") if isinstance(payload.get("model"), str) else None,
            "response_id": payload.get("id") if isinstance(payload.get("id"), str) else None,
            "finish_reason": choice.get("finish_reason") if isinstance(
                choice.get("finish_reason"), str) else None,
            "usage": cast(JSONValue, usage),
            "weights": NO_DIGEST,
        }
        log.info("model_turn", model_id=self.name, endpoint=self.endpoint,
                 reported=served["reported"], finish_reason=served["finish_reason"],
                 prompt_tokens=(usage or {}).get("prompt_tokens"),
                 output_tokens=(usage or {}).get("completion_tokens"),
                 seconds=round(duration, 3))
        return ModelTurn(
            text=text,
            prompt_sha256=prompt_sha256,
            output_sha256=output_sha256,
            prompt_tokens=_count(usage, "prompt_tokens"),
            output_tokens=_count(usage, "completion_tokens"),
            duration_seconds=duration,
            response=payload,
            served=served,
            call_required="tool_choice" in body,
        )

    def _post(self, body: dict[str, JSONValue]) -> dict[str, JSONValue]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise ModelEndpointFailed(
                    f"the API key variable {self.api_key_env} is not set",
                    reason="no_api_key", endpoint=self.endpoint,
                    remediation=f"export {self.api_key_env}, or drop model.api_key_env")
            headers["Authorization"] = f"Bearer {key}"
        client = self._client or httpx2.Client(trust_env=False, follow_redirects=False)
        self._client = client
        try:
            with client.stream("POST", self.url, content=canonical_bytes(body), headers=headers,
                               timeout=self.timeout_seconds) as response:
                if response.status_code != 200:
                    raise ModelEndpointFailed(
                        f"the model server answered HTTP {response.status_code} "
                        f"{_reason_phrase(response.status_code)} at {self.url}",
                        reason="http_status", endpoint=self.endpoint,
                        status=response.status_code,
                        remediation=_status_remediation(response.status_code))
                raw = bytearray()
                for chunk in response.iter_bytes():
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        raise self._malformed(f"the response is larger than "
                                              f"{MAX_RESPONSE_BYTES} bytes")
        except httpx2.TimeoutException as exc:
            raise ModelEndpointFailed(
                f"the model server did not answer within {self.timeout_seconds:g} s "
                f"({type(exc).__name__}) at {self.url}",
                reason="timeout", endpoint=self.endpoint,
                remediation="raise model.timeout_seconds, or check the server's load") from exc
        except httpx2.TransportError as exc:
            raise ModelEndpointFailed(
                f"no connection to the model server at {self.url} ({type(exc).__name__})",
                reason="connection_failed", endpoint=self.endpoint) from exc
        try:
            payload = strict_loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._malformed("the response is not JSON") from exc
        if not isinstance(payload, dict):
            raise self._malformed("the response is not a JSON object")
        return cast(dict[str, JSONValue], payload)

    def _message_of(
        self, payload: Mapping[str, JSONValue]
    ) -> tuple[dict[str, JSONValue], dict[str, JSONValue]]:
        """``choices[0].message`` and ``choices[0]``, their types checked."""
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            raise self._malformed("the response has no choices")
        if not all(isinstance(choice, dict) for choice in choices):
            raise self._malformed("a choice is not an object")
        choice = cast(dict[str, JSONValue], choices[0])
        message = choice.get("message")
        if not isinstance(message, dict):
            raise self._malformed("choices[0].message is not an object")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise self._malformed("choices[0].message.content is not a string")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise self._malformed("choices[0].message.tool_calls is not a list")
        reason = choice.get("finish_reason")
        if reason is not None and not isinstance(reason, str):
            raise self._malformed("choices[0].finish_reason is not a string")
        if not (content or "").strip() and not tool_calls and len(choices) == 1:
            raise self._malformed("the response has neither text nor tool calls")
        return message, choice

    def _malformed(self, what: str) -> ModelEndpointFailed:
        return ModelEndpointFailed(
            f"malformed response from the model server at {self.url}: {what}",
            reason="malformed_response", endpoint=self.endpoint,
            remediation="check that model.endpoint is an OpenAI-compatible /v1 base URL")


def wire_message(message: ChatMessage) -> dict[str, JSONValue]:
    """One message as the chat-completions API takes it."""
    if message.role == "assistant":
        wire: dict[str, JSONValue] = {"role": "assistant", "content": message.content}
        if message.calls:
            wire["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name,
                              "arguments": call.arguments_json.decode("utf-8")}}
                for call in message.calls
            ]
        return wire
    if message.role == "tool":
        if not message.tool_call_id:  # no call to pair it with (a refused, unread message)
            return {"role": "user", "content": f"Tool result: {message.content}"}
        return {"role": "tool", "tool_call_id": message.tool_call_id,
                "content": message.content}
    return {"role": message.role, "content": message.content}


def _usage(
    usage: object, malformed: Callable[[str], ModelEndpointFailed]
) -> dict[str, JSONValue] | None:
    """The server's token counts (prompt, completion, total), checked; None if not given."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise malformed("usage is not an object")
    counts: dict[str, JSONValue] = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise malformed(f"usage.{key} is not a count")
        counts[key] = value
    return counts


def _count(usage: Mapping[str, JSONValue] | None, key: str) -> int:
    """A reported count for ``ModelTurn`` (0 when not reported; ``model.turn`` says null)."""
    value = (usage or {}).get(key)
    return value if isinstance(value, int) else 0


def _reason_phrase(status: int) -> str:
    try:
        return f"({HTTPStatus(status).phrase})"
    except ValueError:
        return ""


def _status_remediation(status: int) -> str:
    if status in (401, 403):
        return "check the API key in model.api_key_env and its rights on the server"
    if status == 404:
        return "check model.endpoint (the /v1 base URL) and model.name"
    if status == 429:
        return "the server limits requests: wait, or raise its limits"
    if status >= 500:
        return "the model server failed: see its own logs"
    return "check model.endpoint and model.name"


def _conforms(model: EndpointChatModel) -> ChatModel:
    """mypy checks here that the endpoint model satisfies the protocol."""
    return model
