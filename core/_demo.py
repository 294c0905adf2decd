"""
``callward demo``: model output in several dialects through the full path,
then the audit log verified offline with only the public key.

No model runs yet: the demo feeds the gateway the text a model would emit.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from callward.core._config import Home, example_config_path
from callward.core.errors import VerificationFailed
from callward.core.types import ToolResult


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


def run_demo(*, home: Home, config: Path | None = None) -> int:
    """Run the demo; return 0 when every step behaved and the log verified, else 1."""
    from callward.audit import verify  # noqa: PLC0415 - the CLI edge wires the stages
    from callward.core.gateway import Gateway  # noqa: PLC0415

    config_path = config or example_config_path()
    print(f"callward demo\n  config: {config_path}\n  home:   {home.root}\n")
    with Gateway.from_config(config_path, home=home.root) as gateway:
        print(f"  tools:  {', '.join(spec.ref for spec in gateway.registry)}")
        print(f"  policy: {gateway.policy.digest[:16]}…  image: "
              f"{str(gateway.runner.image_digest)[:16]}…\n")
        for number, step in enumerate(STEPS, start=1):
            print(f"[{number}] {step.title}  (principal: {step.principal})")
            print(textwrap.indent(step.model_output, "    model> "))
            results = gateway.handle_text(step.model_output, principal=step.principal)
            for result in results:
                print(_describe(result))
            print()

    print("Verifying the audit log offline with only the public key …")
    try:
        verified = verify(home.audit_db, home.public_key)
    except VerificationFailed as exc:
        print(f"  verdict: FAILED at seq {exc.seq}: {exc.message}")
        return 1
    print(f"  verdict: OK  {verified.records} records, head {verified.head_hash[:16]}…")
    print(f"  (callward audit verify --home {home.root})")
    return 0
