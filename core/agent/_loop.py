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
- A model that cannot give a turn (``ModelUnavailable``: a served model that timed
  out, refused the connection, answered 4xx/5xx or a malformed response) is audited
  as ``model.failed`` (kind, reason, endpoint; never an API key) and the run raises:
  never an empty answer in its place.
- A served model's whole API response is what the parser reads (its ``tool_calls``
  and the calls in its text, with the parser's rules on ``finish_reason``); results
  go back as ``tool`` messages paired with their calls by ``tool_call_id``.

Helping a small model (measured by ``bench/agent_accuracy.py``):

- Folded results (``tool_role: user``) say in words, per call, whether it
  succeeded (with its value), was refused by the policy (it did not run), failed
  while running, or could not be read, and the closing instruction speaks of
  refusals only when there was one: a success never reads like a denial. The system
  prompt says nothing about refusals (a small model repeats its last sentence).
- A run that called tools and then answers while its question still names things
  no call covered (``_coverage.uncovered``: numbers, proper nouns, identifiers) is
  asked once more, naming them, to call the tool for them, if the step budget allows.
  The answer it gave is kept aside, not shown to it (a small model asked after its own
  answer repeats it): the follow-up replaces the cue to answer after the results, and
  that turn is required to be a call (``require_call``: ``tool_choice: "required"``
  for a served model, the turn started as a call object for a local one); which tool,
  and whether the policy allows it, is decided as for any call. If it calls nothing
  new (no call, an unreadable one, only repeats), or a budget ends the run first, the
  answer before the follow-up stands; if it calls, the run goes on and its final
  answer is taken. Folded results then show the run's earlier successes and refusals
  too, so that the final answer can state every part. The follow-up is audited as
  ``model.follow_up`` (counts only) and its turn's ``model.turn`` says
  ``call_required``.

With tracing on (the gateway's ``Tracing``), a run is one trace: an ``invoke_agent``
span holding each turn's ``chat`` span, the ``callward.parse`` of its output, the
``execute_tool`` span of each call and the span the ``model.turn`` record is written in.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import structlog

from callward.core._canonical import JSONValue
from callward.core.agent._coverage import uncovered
from callward.core.errors import MalformedCall, ModelUnavailable
from callward.core.gateway import Gateway
from callward.core.models._chat import ChatMessage, ChatModel, ModelTurn
from callward.core.observe._tracing import annotate_outcome, annotate_run, annotate_turn
from callward.core.parse._front import parse_model_output
from callward.core.types import ToolCall, ToolResult

log = structlog.get_logger()

Stop = Literal["answered", "step_budget", "time_budget"]
Clock = Callable[[], float]

SYSTEM_PROMPT: Final = (
    "You are a helpful assistant that answers with the help of tools. To use a tool, "
    "reply with the call and nothing else. When the tool results are in, answer the user "
    "in one short sentence that states the result."
)
FOLDED_RESULTS: Final = "Tool results (these calls are done; do not call them again):\n{results}\n"
ANSWER_NOW: Final = "Now answer the original question in one short sentence with these results."
ANSWER_WITH_REFUSALS: Final = (
    "Now answer the original question in one short sentence with these results; for a "
    "call the policy refused, say that it is not allowed."
)
FOLLOW_UP: Final = (
    "The question also asks about {parts}, and no tool has been called for that yet. "
    "Reply with the tool call for it."
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
        with self.gateway.tracing.agent_span(run_id, self.model.model_id) as span:
            run = self._run(run_id, question)
            annotate_run(span, stop=run.stop, steps=len(run.steps))
            return run

    def _run(self, run_id: str, question: str) -> AgentRun:
        started = self.clock()
        tools = self.tool_schemas()
        messages = [ChatMessage("system", self.system_prompt), ChatMessage("user", question)]
        executed: dict[tuple[str, str], ToolResult] = {}
        steps: list[AgentStep] = []
        named: list[JSONValue] = []  # the run's call arguments and results (_coverage)
        folded: list[str] = []  # the run's results so far, in words (tool_role user)
        followed_up: str | None = None  # the answer a follow-up was asked after
        just_followed_up = False  # this turn answers the follow-up
        answer_cue = ""  # the closing words of the last folded results ("Now answer ...")
        rlog = log.bind(run_id=run_id, model_id=self.model.model_id)
        rlog.info("agent_run_started", tools=len(tools))
        while True:
            spent: Stop | None = (
                "step_budget" if len(steps) >= self.limits.max_steps
                else "time_budget" if self.clock() - started >= self.limits.wall_seconds
                else None)
            if spent is not None:
                # A budget spent after a follow-up: the answer given before it stands.
                return self._finish(run_id, question=question, answer=followed_up,
                                    stop="answered" if followed_up is not None else spent,
                                    steps=steps, started=started)
            with self.gateway.tracing.chat_span(self.model.model_id, len(steps) + 1) as span:
                try:
                    turn = self.model.generate(messages, tools, require_call=just_followed_up)
                except ModelUnavailable as exc:
                    self._record_failure(run_id, len(steps) + 1, exc)
                    raise
                annotate_turn(span, model_id=self.model.model_id,
                              input_tokens=turn.prompt_tokens,
                              output_tokens=turn.output_tokens, served=turn.served)
            origin: dict[str, JSONValue] = {
                "id": self.model.model_id, "digest": self.model.digest, "run_id": run_id,
                "turn": len(steps) + 1, "output_sha256": turn.output_sha256,
            }
            callward_started = self.clock()
            message = turn.text if turn.response is None else turn.response
            with self.gateway.produced_by(origin):
                results, repeats, calls = self._handle(message, executed, run_id)
            receipt = self.gateway.record("model.turn", self._turn_body(
                run_id=run_id, number=len(steps) + 1, turn=turn, results=results,
                repeats=repeats, calls=len(calls)))
            step = AgentStep(len(steps) + 1, turn, results, repeats, receipt.seq,
                             self.clock() - callward_started)
            steps.append(step)
            rlog.info("agent_step", step=step.number, calls=len(results), seq=receipt.seq)
            named += [call.arguments for call in calls]
            named += [result.content for result in results if result.ok]
            if just_followed_up and (not calls or all(repeats)):
                # Asked once more, it called nothing new: its answer before stands.
                return self._finish(run_id, question=question, answer=followed_up,
                                    stop="answered", steps=steps, started=started)
            just_followed_up = False
            if not calls and not results:
                missing = (uncovered(question, named)
                           if named and followed_up is None
                           and len(steps) < self.limits.max_steps else ())
                if not missing:
                    return self._finish(run_id, question=question, answer=turn.text,
                                        stop="answered", steps=steps, started=started)
                followed_up, just_followed_up = turn.text, True
                self.gateway.record("model.follow_up", {
                    "run_id": run_id, "turn": step.number, "principal": self.principal,
                    "session_id": self.session_id, "reason": "question_parts_uncovered",
                    "uncovered": len(missing)})
                follow_up = FOLLOW_UP.format(parts=", ".join(repr(part) for part in missing))
                if answer_cue and messages[-1].role == "user":
                    # Folded results: the follow-up takes the place of their cue to answer.
                    results_text = messages[-1].content.removesuffix(answer_cue)
                    messages[-1] = ChatMessage("user", results_text + follow_up)
                else:
                    messages.append(ChatMessage("user", follow_up))
                continue
            messages.append(ChatMessage("assistant", turn.text, calls=calls))
            returned, answer_cue = self._result_messages(results, repeats, calls, folded)
            messages.extend(returned)

    # -- one turn -------------------------------------------------------------

    def _record_failure(self, run_id: str, number: int, error: ModelUnavailable) -> None:
        """``model.failed``: which model, which turn, the kind and reason; never a key."""
        self.gateway.record("model.failed", {
            "run_id": run_id,
            "turn": number,
            "principal": self.principal,
            "session_id": self.session_id,
            "model": {"id": self.model.model_id, "digest": self.model.digest},
            "kind": error.kind,
            "reason": getattr(error, "reason", "model_unavailable"),
            "endpoint": getattr(error, "endpoint", None),
            "status": getattr(error, "status", None),
            "message": error.message[:1024],
        })

    def _handle(
        self,
        text: str | Mapping[str, JSONValue],
        executed: dict[tuple[str, str], ToolResult],
        run_id: str,
    ) -> tuple[tuple[ToolResult, ...], tuple[bool, ...], tuple[ToolCall, ...]]:
        """
        Run the turn's calls (``text``: the model's text, or a served model's whole API
        response); returns the results, which were repeats, and the calls read (none
        when the message was refused as malformed: then its one result is that refusal).
        """
        started = time.perf_counter()
        with self.gateway.tracing.span("callward.parse") as span:
            calls: tuple[ToolCall, ...] | None
            try:
                calls = parse_model_output(
                    text, parameter_order=self.gateway.registry.parameter_order,
                    new_id=self.gateway.new_id,
                )
                span.set_attribute("callward.parse.calls", len(calls))
            except MalformedCall:
                annotate_outcome(span, "malformed")
                calls = None
        if calls is None:
            # The gateway parses again, refuses, audits call.rejected; nothing runs.
            rejected = self.gateway.handle_text(text, principal=self.principal,
                                                session_id=self.session_id)
            return rejected, (False,) * len(rejected), ()
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
        return tuple(results), tuple(repeats), tuple(calls)

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
            "model": {"id": self.model.model_id, "digest": self.model.digest,
                      **({"dtype": turn.dtype} if turn.dtype else {}),
                      **({"prompts_in_float32": True} if turn.prompts_in_float32 else {}),
                      **(dict(turn.served) if turn.served is not None else {})},
            "prompt_sha256": turn.prompt_sha256,
            "output_sha256": turn.output_sha256,
            "output_bytes": len(turn.text.encode("utf-8", "surrogatepass")),
            "tokens": _tokens(turn),
            "duration_ms": round(turn.duration_seconds * 1000, 3),
            **({"call_required": True} if turn.call_required else {}),
            "calls": calls,
            "results": [
                {"call_id": result.call_id, "kind": result.kind, "seq": result.receipt.seq,
                 "repeat": repeat}
                for result, repeat in zip(results, repeats, strict=True)
            ],
        }

    def _result_messages(
        self,
        results: tuple[ToolResult, ...],
        repeats: tuple[bool, ...],
        calls: tuple[ToolCall, ...],
        folded: list[str],
    ) -> tuple[list[ChatMessage], str]:
        """
        The results as the model reads them. In the tool role, one ``tool`` message per
        call, paired by ``tool_call_id`` with the call this turn stated (a repeat's
        result carries the earlier call's id, so the pairing uses this turn's call); a
        message refused as malformed stated no call, so its refusal has no id (a served
        model gets it as a user turn). Folded, one user turn that says per call what
        became of it, after the run's earlier successes and refusals (``folded``, which
        this extends), so that an answer after several turns can state every part,
        ending with the cue to answer, which is returned too ("" in the tool role).
        """
        stated: tuple[ToolCall | None, ...] = (
            calls if len(calls) == len(results) else (None,) * len(results))
        if self.model.tool_role == "tool":
            return [ChatMessage("tool", _for_model(result, repeat=repeat), name=result.tool,
                                tool_call_id=call.id if call is not None else "")
                    for result, repeat, call in zip(results, repeats, stated, strict=True)], ""
        lines = [_folded(result, repeat=repeat, call=call)
                 for result, repeat, call in zip(results, repeats, stated, strict=True)]
        shown = [line for line in folded if line not in lines] + lines
        folded.extend(line for result, line in zip(results, lines, strict=True)
                      if (result.ok or _refused(result)) and line not in folded)
        cue = ANSWER_WITH_REFUSALS if any(" was REFUSED " in line for line in shown) \
            else ANSWER_NOW
        return [ChatMessage("user", FOLDED_RESULTS.format(results="\n".join(shown)) + cue)], cue

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


def _tokens(turn: ModelTurn) -> dict[str, JSONValue]:
    """The turn's token counts: the model's own, or what a server reported (None if not)."""
    if turn.served is not None:
        usage = turn.served.get("usage")
        reported = usage if isinstance(usage, dict) else {}
        return {"prompt": reported.get("prompt_tokens"),
                "output": reported.get("completion_tokens")}
    return {"prompt": turn.prompt_tokens, "output": turn.output_tokens,
            **({"prompt_cached": turn.cached_prompt_tokens}
               if turn.cached_prompt_tokens else {})}


def _refused(result: ToolResult) -> bool:
    return result.decision is not None and result.decision.effect == "deny"


def _folded(result: ToolResult, *, repeat: bool, call: ToolCall | None) -> str:
    """
    One result in words, its outcome first: ``succeeded``, ``was REFUSED by the policy``,
    ``ran and FAILED`` or ``could not be read``; never the same words for two outcomes.
    """
    what = result.tool or "a call"
    if call is not None:
        what = f"{call.name}({json.dumps(call.arguments, ensure_ascii=False, sort_keys=True)})"
    content = json.dumps(result.content, ensure_ascii=False, sort_keys=True)
    if result.ok:
        earlier = " (it ran earlier; not run again)" if repeat else ""
        return f"- {what} succeeded{earlier}. Result: {content}"
    if result.kind == "malformed":
        return (f"- {what} could not be read ({result.kind}): {content}. Nothing ran; "
                "write the call again as valid JSON.")
    if _refused(result):
        return (f"- {what} was REFUSED by the policy ({result.kind}): {content}. It did not "
                "run; do not retry it.")
    return f"- {what} ran and FAILED ({result.kind}): {content}"


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

