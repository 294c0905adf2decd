"""
The agent loop: a model turn, its calls through the gateway, the results back, again.

Invariants:

- Every call the model emits goes through the gateway (policy, sandbox, audit);
  the agent never runs a tool itself.
- Every model turn is written to the audit log as ``model.turn`` (model id and
  digest, prompt and output hashes, token counts, duration, and the ids and
  receipts of the calls that output caused) before the results go back; every
  call record that output caused carries the model id, digest, run, turn and
  output hash under ``"model"``.
- A call the model repeats (same tool, same canonical arguments) after it ran is
  not run again: the earlier result goes back, marked as a repeat, and the repeat
  is audited as ``model.repeated_call``.
- A denied or malformed call goes back to the model as an error it can explain or
  correct; nothing runs.
- The loop ends when the model answers without calling a tool, or when the step
  or time budget is spent; the run says which.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import structlog

from callward.core._canonical import JSONValue
from callward.core.errors import MalformedCall
from callward.core.gateway import Gateway
from callward.core.models._chat import ChatMessage, ChatModel, ModelTurn
from callward.core.parse._front import parse_model_output
from callward.core.types import ToolResult

log = structlog.get_logger()

Stop = Literal["answered", "step_budget", "time_budget"]
Clock = Callable[[], float]

SYSTEM_PROMPT: Final = (
    "You are a helpful assistant that answers with the help of tools. To use a tool, "
    "reply with the call and nothing else. When the tool results are in, answer the user "
    "in one short sentence that states the result. If a tool call is denied, do not "
    "retry it: tell the user it was not allowed and why."
)
FOLDED_RESULTS: Final = (
    "Tool results (already executed; do not call these tools again):\n{results}\n"
    "Now answer the original question in one short sentence."
)


@dataclass(frozen=True, slots=True)
class AgentLimits:
    """The budget of one run: model turns, wall-clock time."""

    max_steps: int = 6
    wall_seconds: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_steps <= 100:
            raise ValueError("max_steps must be in [1, 100]")
        if not 0 < self.wall_seconds <= 86400:
            raise ValueError("wall_seconds must be in (0, 86400]")


@dataclass(frozen=True, slots=True)
class AgentStep:
    """
    One model turn and what became of its calls.

    Attributes:
        results: One per call the turn emitted, in order; a repeat holds the earlier result.
        repeats: For each result, whether its call was a repeat that did not run again.
        turn_seq: The seq of this turn's ``model.turn`` record.
        callward_seconds: Wall-clock time callward itself spent on this turn: parsing,
            every call through the gateway (policy, audit, sandbox dispatch and run) and
            the ``model.turn`` record; the model's generation is not in it.
    """

    number: int
    turn: ModelTurn
    results: tuple[ToolResult, ...]
    repeats: tuple[bool, ...]
    turn_seq: int
    callward_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class AgentRun:
    """The whole run: the answer (if any), every step, and why it stopped."""

    run_id: str
    question: str
    answer: str | None
    stop: Stop
    steps: tuple[AgentStep, ...]
    seconds: float


@dataclass
class Agent:
    """
    Runs a question through ``model`` and ``gateway`` until an answer or a budget ends.

    ``run()`` may be called many times; each run has its own conversation and its
    own record of executed calls.
    """

    gateway: Gateway
    model: ChatModel
    principal: str
    session_id: str = ""
    limits: AgentLimits = field(default_factory=AgentLimits)
    system_prompt: str = SYSTEM_PROMPT
    clock: Clock = time.monotonic
    new_run_id: Callable[[], str] = field(default=lambda: f"run_{uuid.uuid4().hex[:16]}")

    def tool_schemas(self) -> list[dict[str, JSONValue]]:
        """
        The tools this principal could be allowed, as chat-template ``tools=`` entries
        (OpenAI function form); the others are not shown to the model at all.
        """
        return [
            {
                "type": "function",
                "function": {
                    "name": spec.name,
                    "description": spec.description,
                    "parameters": spec.parameters,
                },
            }
            for spec in self.gateway.tools_for(self.principal, session_id=self.session_id)
        ]

    def run(self, question: str) -> AgentRun:
        """
        Answer ``question``, calling tools through the gateway as the model asks.

        Raises:
            AuditUnavailable: A record could not be written; the run stops there.
            ModelUnavailable: The model could not generate.
        """
        run_id = self.new_run_id()
        started = self.clock()
        tools = self.tool_schemas()
        messages = [ChatMessage("system", self.system_prompt), ChatMessage("user", question)]
        executed: dict[tuple[str, str], ToolResult] = {}
        steps: list[AgentStep] = []
        rlog = log.bind(run_id=run_id, model_id=self.model.model_id)
        rlog.info("agent_run_started", tools=len(tools))
        while True:
            if len(steps) >= self.limits.max_steps:
                return self._finish(run_id, question=question, answer=None, stop="step_budget",
                                    steps=steps, started=started)
            if self.clock() - started >= self.limits.wall_seconds:
                return self._finish(run_id, question=question, answer=None, stop="time_budget",
                                    steps=steps, started=started)
            turn = self.model.generate(messages, tools)
            origin: dict[str, JSONValue] = {
                "id": self.model.model_id, "digest": self.model.digest, "run_id": run_id,
                "turn": len(steps) + 1, "output_sha256": turn.output_sha256,
            }
            callward_started = self.clock()
            with self.gateway.produced_by(origin):
                results, repeats, calls = self._handle(turn.text, executed, run_id)
            receipt = self.gateway.record("model.turn", self._turn_body(
                run_id=run_id, number=len(steps) + 1, turn=turn, results=results,
                repeats=repeats, calls=calls))
            step = AgentStep(len(steps) + 1, turn, results, repeats, receipt.seq,
                             self.clock() - callward_started)
            steps.append(step)
            rlog.info("agent_step", step=step.number, calls=len(results), seq=receipt.seq)
            if not calls and not results:
                return self._finish(run_id, question=question, answer=turn.text, stop="answered",
                                    steps=steps, started=started)
            messages.append(ChatMessage("assistant", turn.text))
            messages.extend(self._result_messages(results, repeats))

    # -- one turn -------------------------------------------------------------

    def _handle(
        self, text: str, executed: dict[tuple[str, str], ToolResult], run_id: str
    ) -> tuple[tuple[ToolResult, ...], tuple[bool, ...], int]:
        """Run the turn's calls; returns the results, which were repeats, and the call count."""
        started = time.perf_counter()
        try:
            calls = parse_model_output(
                text, parameter_order=self.gateway.registry.parameter_order,
                new_id=self.gateway.new_id,
            )
        except MalformedCall:
            # The gateway parses again, refuses, audits call.rejected; nothing runs.
            rejected = self.gateway.handle_text(text, principal=self.principal,
                                                session_id=self.session_id)
            return rejected, (False,) * len(rejected), 0
        parse_ms = round((time.perf_counter() - started) * 1000, 3)
        results: list[ToolResult] = []
        repeats: list[bool] = []
        for call in calls:
            key = (call.name, call.arguments_sha256)
            earlier = executed.get(key)
            if earlier is not None:
                self.gateway.record("model.repeated_call", {
                    "run_id": run_id,
                    "call_id": call.id,
                    "tool": call.name[:256],
                    "arguments_sha256": call.arguments_sha256,
                    "earlier_call_id": earlier.call_id,
                    "earlier_seq": earlier.receipt.seq,
                    "principal": self.principal,
                    "session_id": self.session_id,
                })
                results.append(earlier)
                repeats.append(True)
                continue
            result = self.gateway.handle(call, principal=self.principal,
                                         session_id=self.session_id, parse_ms=parse_ms)
            if result.decision is not None and result.decision.effect == "allow":
                executed[key] = result
            results.append(result)
            repeats.append(False)
        return tuple(results), tuple(repeats), len(calls)

    def _turn_body(
        self,
        *,
        run_id: str,
        number: int,
        turn: ModelTurn,
        results: tuple[ToolResult, ...],
        repeats: tuple[bool, ...],
        calls: int,
    ) -> dict[str, JSONValue]:
        return {
            "run_id": run_id,
            "turn": number,
            "principal": self.principal,
            "session_id": self.session_id,
            "model": {"id": self.model.model_id, "digest": self.model.digest},
            "prompt_sha256": turn.prompt_sha256,
            "output_sha256": turn.output_sha256,
            "output_bytes": len(turn.text.encode("utf-8", "surrogatepass")),
            "tokens": {"prompt": turn.prompt_tokens, "output": turn.output_tokens},
            "duration_ms": round(turn.duration_seconds * 1000, 3),
            "calls": calls,
            "results": [
                {"call_id": result.call_id, "kind": result.kind, "seq": result.receipt.seq,
                 "repeat": repeat}
                for result, repeat in zip(results, repeats, strict=True)
            ],
        }

    def _result_messages(
        self, results: tuple[ToolResult, ...], repeats: tuple[bool, ...]
    ) -> list[ChatMessage]:
        contents = [_for_model(result, repeat=repeat)
                    for result, repeat in zip(results, repeats, strict=True)]
        if self.model.tool_role == "tool":
            return [ChatMessage("tool", content, name=result.tool)
                    for result, content in zip(results, contents, strict=True)]
        folded = "\n".join(f"- {result.tool or 'call'}: {content}"
                           for result, content in zip(results, contents, strict=True))
        return [ChatMessage("user", FOLDED_RESULTS.format(results=folded))]

    def _finish(
        self,
        run_id: str,
        *,
        question: str,
        answer: str | None,
        stop: Stop,
        steps: list[AgentStep],
        started: float,
    ) -> AgentRun:
        log.info("agent_run_finished", run_id=run_id, stop=stop, steps=len(steps))
        return AgentRun(run_id, question, answer, stop, tuple(steps), self.clock() - started)


def _for_model(result: ToolResult, *, repeat: bool) -> str:
    """What the model reads of one result: the value, or the error kind and what to do."""
    message: dict[str, JSONValue] = {"tool": result.tool, "status": result.kind}
    if result.ok:
        message["result"] = result.content
    else:
        message["error"] = result.content
        if result.decision is not None and result.decision.effect == "deny":
            message["note"] = "denied by policy: do not retry; tell the user it is not allowed"
        elif result.kind == "malformed":
            message["note"] = "the call could not be read; emit it again as valid JSON"
    if repeat:
        message["note"] = "already executed earlier; this is the earlier result, not run again"
    return json.dumps(message, ensure_ascii=False, sort_keys=True)

