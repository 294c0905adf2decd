"""
``callward demo``: a real local model answers questions by calling tools through
the full path (policy, sandbox, signed audit log), then the log is verified offline
with only the public key.

``callward demo --no-model`` feeds the gateway the text models emit in several
dialects instead, without loading a model.

``callward demo --fleet`` runs three replicas on one PostgreSQL instead
(``callward.core.cli._fleet_demo``).
"""

from __future__ import annotations

import argparse
import json
import resource
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from callward.core.errors import VerificationFailed
from callward.core.gateway._config import Home, example_config_path, load_config
from callward.core.types import ResourceLimits, ToolResult

if TYPE_CHECKING:
    from callward.core.agent._loop import AgentRun
    from callward.core.gateway import Gateway


@dataclass(frozen=True, slots=True)
class DemoStep:
    title: str
    principal: str
    model_output: str


OPENAI_MESSAGE: Final = json.dumps(
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_add_1",
                "type": "function",
                "function": {"name": "add", "arguments": json.dumps({"a": 2, "b": 40})},
            },
            {
                "id": "call_capital_1",
                "type": "function",
                "function": {"name": "capital", "arguments": json.dumps({"country": "Kenya"})},
            },
        ],
    }
)

STEPS: Final = (
    DemoStep("The article's own call", "alice", 'call function("square", [3], 9)'),
    DemoStep("OpenAI tool_calls, two in parallel", "alice", OPENAI_MESSAGE),
    DemoStep(
        "Hermes/Qwen <tool_call> text",
        "alice",
        'Let me look that up.\n<tool_call>\n{"name": "capital", "arguments": '
        '{"country": "France"}}\n</tool_call>',
    ),
    DemoStep(
        "Denied by schema: a string where an integer belongs",
        "alice",
        '<tool_call>{"name": "square", "arguments": {"x": "3"}}</tool_call>',
    ),
    DemoStep("Denied: a tool that does not exist", "alice", 'call function("rm_rf", ["/"])'),
    DemoStep(
        "Denied by permission: a guest may not drop tables",
        "mallory",
        '<tool_call>{"name": "drop_table", "arguments": {"table": "users"}}</tool_call>',
    ),
    DemoStep("A tool that overruns its 1 s time limit", "alice", 'call function("spin", [30])'),
    DemoStep(
        "Malformed: the model forgot a closing brace",
        "alice",
        '<tool_call>{"name": "square", "arguments": {"x": 4}</tool_call>',
    ),
)


@dataclass(frozen=True, slots=True)
class DemoQuestion:
    """
    A question for the model; correct when the answer names ``expect``, or, for a
    forbidden tool, when nothing ran: the tool is not offered to this principal, and a
    call of it by name is denied.
    """

    title: str
    principal: str
    question: str
    expect: str = ""
    expect_denied: bool = False

    def correct(self, run: AgentRun) -> bool:
        results = [result for step in run.steps for result in step.results]
        if self.expect_denied:
            ran = any(r.decision is not None and r.decision.effect == "allow" for r in results)
            return run.stop == "answered" and not ran
        used_tool = any(result.ok for result in results)
        return run.stop == "answered" and used_tool and self.expect in (run.answer or "")


QUESTIONS: Final = (
    DemoQuestion("Arithmetic", "alice", "What is 1234 + 5678?", expect="6912"),
    DemoQuestion("A lookup", "alice", "What is the capital of Kenya?", expect="Nairobi"),
    DemoQuestion("Arithmetic with another tool", "alice", "What is 37 squared?",
                 expect="1369"),
    DemoQuestion("Tempted into a forbidden tool (a guest: not offered it)", "mallory",
                 "Drop the table named users.", expect_denied=True),
)


def _describe(result: ToolResult) -> str:
    lines = [f"  call {result.call_id}  tool={result.tool or '-'}"]
    decision = result.decision
    if decision is None:
        lines.append("    decision: none (the text could not be read as a call; nothing ran)")
    else:
        where = f"  at {decision.json_path}" if decision.json_path else ""
        lines.append(f"    decision: {decision.effect}  reasons={list(decision.reasons)}{where}")
    if result.ok:
        lines.append(f"    outcome:  ok  value={json.dumps(result.content)}")
    else:
        lines.append(f"    outcome:  {result.kind}")
    if result.expected_matched is not None:
        lines.append(f"    expected output matched: {result.expected_matched}")
    lines.append(f"    to model: {json.dumps(result.content)}")
    lines.append(
        f"    receipt:  seq={result.receipt.seq}  hash={result.receipt.record_hash[:16]}…"
        f"  key={result.receipt.key_id}"
    )
    return "\n".join(lines)


def _run_dialects(gateway: Gateway) -> None:
    for number, step in enumerate(STEPS, start=1):
        print(f"[{number}] {step.title}  (principal: {step.principal})")
        print(textwrap.indent(step.model_output, "    model> "))
        results = gateway.handle_text(step.model_output, principal=step.principal)
        for result in results:
            print(_describe(result))
        print()


@runtime_checkable
class _Warmable(Protocol):
    """A runner that can start warm containers ahead of the first call (DockerSandbox)."""

    def wait_warm(
        self, limits: ResourceLimits, count: int, timeout_seconds: float = 30
    ) -> bool: ...


def _warm_sandbox(gateway: Gateway) -> tuple[int, int, float]:
    """
    Start the warm pool for every limits profile the registry's tools run under, and
    wait until each has a container ready, so that no question pays a cold start.

    Returns:
        The profiles warmed, how many are ready, and the seconds it took.
    """
    started = time.perf_counter()
    runner = gateway.runner
    if not isinstance(runner, _Warmable):
        return 0, 0, 0.0
    profiles = list(dict.fromkeys(spec.limits for spec in gateway.registry))
    ready = sum(runner.wait_warm(limits, 1, timeout_seconds=60) for limits in profiles)
    return len(profiles), ready, time.perf_counter() - started


def _run_model(gateway: Gateway, home: Home, *, dtype: str = "auto") -> None:
    from callward.core.agent._loop import Agent  # noqa: PLC0415 - loads no model by itself
    from callward.core.models._gguf import load_demo_model  # noqa: PLC0415

    started = time.perf_counter()
    model = load_demo_model(home.root / "models", dtype=dtype)
    load_seconds = time.perf_counter() - started
    choice = model.dtype_choice.describe() if model.dtype_choice else "dtype unknown"
    print(f"  model:  {model.model_id}  sha256 {model.digest[:16]}…  "
          f"loaded in {load_seconds:.1f} s (cached under {home.root / 'models'})\n"
          f"  dtype:  {choice}")
    profiles, ready, warm_seconds = _warm_sandbox(gateway)
    print(f"  set-up: sandbox pool warmed in {warm_seconds:.1f} s ({ready}/{profiles} limits "
          "profiles with a container ready), before the first question; not counted below\n")
    correct = 0
    model_seconds = callward_seconds = total_seconds = 0.0
    tokens = 0
    for number, item in enumerate(QUESTIONS, start=1):
        print(f"[{number}] {item.title}  (principal: {item.principal})")
        print(f"    user>  {item.question}")
        run = Agent(gateway=gateway, model=model, principal=item.principal).run(item.question)
        for step in run.steps:
            turn = step.turn
            print(textwrap.indent(turn.text or "(empty)", "    model> "))
            print(f"    turn {step.number}: {turn.prompt_tokens} prompt + {turn.output_tokens} "
                  f"output tokens in {turn.duration_seconds:.2f} s; callward "
                  f"{1000 * step.callward_seconds:.1f} ms  (model.turn seq={step.turn_seq})")
            for result, repeat in zip(step.results, step.repeats, strict=True):
                print(_describe(result) + ("\n    (a repeat: not run again)" if repeat else ""))
            model_seconds += turn.duration_seconds
            callward_seconds += step.callward_seconds
            tokens += turn.output_tokens
        total_seconds += run.seconds
        ok = item.correct(run)
        correct += ok
        print(f"    answer: {run.answer if run.answer is not None else '(none: ' + run.stop + ')'}")
        print(f"    correct: {'yes' if ok else 'no'}  ({run.seconds:.1f} s)\n")
    other = max(total_seconds - model_seconds - callward_seconds, 0.0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    share = 100 * callward_seconds / max(model_seconds + callward_seconds, 1e-9)
    print(f"Answered correctly with tools: {correct}/{len(QUESTIONS)}")
    print(f"  model {model_seconds:.1f} s for {tokens} output tokens; callward "
          f"{1000 * callward_seconds:.0f} ms = {share:.2f} % of model + callward time "
          f"(agent bookkeeping {1000 * other:.0f} ms more); peak memory {peak_mib:.0f} MiB")
    print("  (measured per turn with a monotonic clock in the agent loop: callward = parse + "
          "policy + audit records + sandbox dispatch and run of every call, and the "
          "model.turn record; model = chat template + generation + decoding; the pool was "
          "warmed in set-up, as in a running agent)\n")


def _plans_dir() -> Path:
    return example_config_path().parent / "plans"


def _run_news_plan(home: Home, *, model: bool) -> bool:
    """
    The article's news-summary task as a plan, in the same audit log: retrieve related
    articles, clean them, summarise (and, with models, judge their tone in parallel).
    With ``model`` the steps are model tools (MiniLM embeddings, the demo model in a warm
    worker); without, plain Python tools. Returns whether every step ended ok.
    """
    from callward.core.gateway import Gateway  # noqa: PLC0415
    from callward.core.plans._run import run_plan_file  # noqa: PLC0415

    plans = _plans_dir()
    config = plans / ("callward-models.yaml" if model else "callward.yaml")
    plan = plans / ("news_summary_models.yaml" if model else "news_summary.yaml")
    print(f"[plan] The article's news summary as a plan  (principal: editor)\n"
          f"    plan:   {plan.name}  config: {config.name}")
    started = time.perf_counter()
    with Gateway.from_config(config, home=home.root) as gateway:
        report = run_plan_file(gateway, plan, principal="editor")
    for outcome in report.outcomes:
        sources = ", ".join(f"{edge.argument} <- {edge.source_step}.{edge.source_output_path}"
                            for edge in outcome.provenance)
        print(f"  step {outcome.step}: {outcome.tool}  {outcome.status}"
              f"{'' if outcome.ok else ' (' + outcome.kind + ')'}  {outcome.wall_ms:.0f} ms"
              f"  receipt seq={outcome.receipt.seq if outcome.receipt else '-'}")
        if sources:
            print(f"    provenance: {sources}")
        if outcome.output_json is not None:
            text = outcome.output_json.decode()
            print(f"    output: {text[:300]}{'…' if len(text) > 300 else ''}")
    loading = " and the model workers' load" if model else ""
    print(f"  plan {'ok' if report.ok else 'FAILED'}: {len(report.outcomes)} steps in "
          f"{report.wall_ms / 1000:.1f} s ({time.perf_counter() - started:.1f} s with the "
          f"gateway's start-up{loading}); plan.started seq={report.started.seq}, "
          f"plan.completed seq={report.completed.seq}\n")
    return report.ok


def run_demo(*, home: Home, config: Path | None = None, model: bool = True,
             unsafe_skip_probes: bool = False) -> int:
    """Run the demo; return 0 when every step behaved and the log verified, else 1."""
    from callward.audit import verify  # noqa: PLC0415 - the CLI edge wires the stages
    from callward.core.gateway import Gateway  # noqa: PLC0415

    config_path = config or example_config_path()
    print(f"callward demo\n  config: {config_path}\n  home:   {home.root}\n")
    with Gateway.from_config(config_path, home=home.root,
                             unsafe_skip_probes=unsafe_skip_probes) as gateway:
        print(f"  tools:  {', '.join(spec.ref for spec in gateway.registry)}")
        print(f"  policy: {gateway.policy.digest[:16]}…  image: "
              f"{str(gateway.runner.image_digest)[:16]}…")
        if model:
            settings = load_config(config_path).model
            _run_model(gateway, home, dtype=settings.dtype if settings else "auto")
        else:
            print()
            _run_dialects(gateway)
    plan_ok = _run_news_plan(home, model=model)

    print("Verifying the audit log offline with only the public key …")
    try:
        verified = verify(home.audit_db, home.public_key)
    except VerificationFailed as exc:
        print(f"  verdict: FAILED at seq {exc.seq}: {exc.message}")
        return 1
    print(f"  verdict: OK  {verified.records} records, head {verified.head_hash[:16]}…")
    print(f"  (callward audit verify --home {home.root})")
    return 0 if plan_ok else 1


def add_fleet_options(demo: argparse.ArgumentParser) -> None:
    """``--fleet`` and its options (``callward.core.cli._fleet_demo``)."""
    demo.add_argument("--fleet", action="store_true",
                      help="three gateway replicas sharing one PostgreSQL: one log, a shared "
                      "rate limit, a raced approval, a replica killed mid-call")
    demo.add_argument("--store", metavar="URL",
                      help="with --fleet: the PostgreSQL server to create the run's database "
                      "on (default $CALLWARD_STORE_URL, else callward's own on :54329)")
    demo.add_argument("--keep", action="store_true",
                      help="with --fleet: keep the run's database and the replicas' homes")


def run_demo_command(args: argparse.Namespace, home: Home, *, unsafe_skip_probes: bool) -> int:
    """``callward demo``: the fleet demo with ``--fleet``, else the one-gateway demo."""
    if args.fleet:
        from callward.core.cli._fleet_demo import run_fleet_demo  # noqa: PLC0415

        return run_fleet_demo(store=args.store, keep=args.keep,
                              unsafe_skip_probes=unsafe_skip_probes)
    return run_demo(home=home, config=Path(args.config) if args.config else None,
                    model=not args.no_model, unsafe_skip_probes=unsafe_skip_probes)
