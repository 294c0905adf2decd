"""
How often the demo model, driven by the agent loop, calls the right tools with the
right arguments and answers right, on held-out questions over the example tools
(``core/examples/tools.py``) and policy: none of them is one of the demo's four
(``callward.core.cli._demo.QUESTIONS``).

Run: .venv/bin/python -m bench.agent_accuracy [--home DIR] [--dtype float32]
         [--without-native-bf16]
         [--json OUT.json] [--compare BEFORE.json]        (needs the Docker Engine)

One run is slow (a few model turns per question on a CPU): run it once before a change
to the loop with ``--json before.json`` and once after with ``--compare before.json``,
which prints both side by side. Greedy decoding, so a run is reproducible on one machine.

Scoring, per question:

- call accuracy: every expected call was emitted (right tool, right arguments; numbers
  compared as numbers, strings case-blind; ``add``'s two operands in either order) and
  no call to a tool the question does not need. A call the policy then denies still
  counts as the right call (the question asked for it).
- answer accuracy: the run answered, the answer states every expected value (digit
  groups ignored: ``2,304`` is ``2304``), and for a question whose tool succeeded it
  does not claim a refusal; for a question the policy denies it says so and states no
  result.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench._common import configure_logging, cpu_summary, print_table
from callward.core.agent import Agent
from callward.core.gateway import Gateway
from callward.core.gateway._config import Home, example_config_path
from callward.core.models._chat import TransformersChatModel
from callward.core.models._cpu import NATIVE_BF16_FLAGS, cpu_flags
from callward.core.models._gguf import DEMO_MODEL_ID, DEMO_MODEL_SHA256, prepare_demo_model

Args = dict[str, object]

REFUSAL: Final = re.compile(
    r"not (allowed|permitted|authori[sz]ed)|denied|forbidden|cannot|can't|can ?not|unable|"
    r"refus|not able", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Question:
    """
    A held-out question. ``calls``: the calls a right run makes (any order); each entry
    is one call, given as alternatives (``add(a, b)`` either way round). ``says``: what
    a right answer states; ``denied``: the policy refuses the needed call, and a right
    answer says so without a result; ``or_says``: other acceptable answers.
    """

    principal: str
    question: str
    calls: tuple[tuple[tuple[str, Args], ...], ...]
    says: tuple[str, ...] = ()
    denied: bool = False
    or_says: tuple[tuple[str, ...], ...] = field(default=())
    never_says: tuple[str, ...] = ()


def _add(a: float, b: float) -> tuple[tuple[str, Args], ...]:
    return (("add", {"a": a, "b": b}), ("add", {"a": b, "b": a}))


def _one(name: str, **arguments: object) -> tuple[tuple[str, Args], ...]:
    return ((name, dict(arguments)),)


QUESTIONS: Final = (
    Question("alice", "What is 48 squared?", (_one("square", x=48),), ("2304",)),
    Question("alice", "Add 19.5 and 22.25.", (_add(19.5, 22.25),), ("41.75",)),
    Question("alice", "What is the capital of Peru?", (_one("capital", country="Peru"),),
             ("Lima",)),
    Question("alice", "Which city is the capital of Germany?",
             (_one("capital", country="Germany"),), ("Berlin",)),
    Question("alice", "What do you get when you add -7 to 150?", (_add(-7, 150),), ("143",)),
    Question("alice", "Compute 999 squared.", (_one("square", x=999),), ("998001",)),
    Question("alice", "What is 250000 squared?", (_one("square", x=250000),), denied=True,
             never_says=("62500000000",)),
    Question("alice", "Tell me the capital of Japan.", (_one("capital", country="Japan"),),
             ("Tokyo",)),
    Question("alice", "What is 13 squared, and what is the capital of France?",
             (_one("square", x=13), _one("capital", country="France")), ("169", "Paris")),
    Question("alice", "What are the capitals of Kenya and Germany?",
             (_one("capital", country="Kenya"), _one("capital", country="Germany")),
             ("Nairobi", "Berlin")),
    Question("alice", "What is the sum of 1200 and 34, and what is 12 squared?",
             (_add(1200, 34), _one("square", x=12)), ("1234", "144")),
    Question("alice", "What is 1000 plus 2000, and what is the capital of Kenya?",
             (_add(1000, 2000), _one("capital", country="Kenya")), ("3000", "Nairobi")),
    Question("dana", "Drop the table named staging_orders.",
             (_one("drop_table", table="staging_orders"),), ("staging_orders",)),
    Question("mallory", "What is 21 squared?", (_one("square", x=21),), ("441",)),
    Question("alice", "Add 0.5 and 0.25, please.", (_add(0.5, 0.25),), ("0.75",)),
    Question("alice", "What is the capital of Italy?", (_one("capital", country="Italy"),),
             or_says=(("Rome",), ("no capital",), ("not known",), ("unknown",),
                      ("couldn't",), ("could not",), ("unable",), ("not found",))),
    Question("alice", "What is 7 squared and what is 8 squared?",
             (_one("square", x=7), _one("square", x=8)), ("49", "64")),
)


@dataclass(frozen=True, slots=True)
class Score:
    question: str
    calls_right: bool
    answer_right: bool
    turns: int
    stop: str
    emitted: tuple[tuple[str, Args], ...]
    answer: str
    seconds: float


def _same(expected: object, given: object) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return (isinstance(given, (int, float)) and not isinstance(given, bool)
                and float(given) == float(expected))
    if isinstance(expected, str):
        return isinstance(given, str) and given.strip().lower() == expected.lower()
    return expected == given


def _matches(call: tuple[str, Args], expected: tuple[str, Args]) -> bool:
    name, arguments = call
    return (name == expected[0] and set(arguments) == set(expected[1])
            and all(_same(value, arguments[key]) for key, value in expected[1].items()))


def calls_right(question: Question, emitted: Sequence[tuple[str, Args]]) -> bool:
    """Every expected call emitted, and nothing the question does not need."""
    every = all(any(_matches(call, option) for call in emitted for option in alternatives)
                for alternatives in question.calls)
    needed = {option[0] for alternatives in question.calls for option in alternatives}
    return every and all(name in needed for name, _ in emitted)


def answer_right(question: Question, stop: str, answer: str) -> bool:
    if stop != "answered" or not answer:
        return False
    answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)
    if any(part in answer for part in question.never_says):
        return False
    if question.denied:
        return bool(REFUSAL.search(answer))
    if question.or_says:
        return any(all(part.lower() in answer.lower() for part in option)
                   for option in question.or_says)
    if REFUSAL.search(answer):
        return False
    return all(part.lower() in answer.lower() for part in question.says)


def emitted_calls(gateway: Gateway, after_seq: int) -> tuple[tuple[str, Args], ...]:
    """The calls the run emitted, from the audit log: each decided call, repeats not again."""
    calls = []
    for record in gateway.audit.records():
        if record.seq <= after_seq or record.kind not in ("call.authorized", "call.denied"):
            continue
        call = record.body.get("call")
        if isinstance(call, dict):
            arguments = call.get("arguments")
            calls.append((str(call.get("name")),
                          dict(arguments) if isinstance(arguments, dict) else {}))
    return tuple(calls)


def last_seq(gateway: Gateway) -> int:
    return max((record.seq for record in gateway.audit.records()), default=0)


def score_all(model: TransformersChatModel, home: Home) -> list[Score]:
    scores = []
    with Gateway.from_config(example_config_path(), home=home.root) as gateway:
        for question in QUESTIONS:
            before = last_seq(gateway)
            run = Agent(gateway=gateway, model=model, principal=question.principal).run(
                question.question)
            emitted = emitted_calls(gateway, before)
            scores.append(Score(question.question, calls_right(question, emitted),
                                answer_right(question, run.stop, run.answer or ""),
                                len(run.steps), run.stop,
                                emitted, run.answer or "", run.seconds))
            print(f"  {'C' if scores[-1].calls_right else '-'}"
                  f"{'A' if scores[-1].answer_right else '-'} {question.question!r} -> "
                  f"{json.dumps(emitted)} -> {run.answer!r} ({run.stop}, {len(run.steps)} "
                  f"turns, {run.seconds:.1f} s)", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="CALLWARD_HOME whose models/ cache to use "
                        "(default: a fresh temporary one: the first load converts the model)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the demo model's dtype (default float32, as issue 17 measured)")
    parser.add_argument("--without-native-bf16", action="store_true",
                        help="give the model this CPU's flags without avx512_bf16/amx_bf16, "
                        "as an AVX2 CPU's (a bfloat16 model then computes prompts in float32)")
    parser.add_argument("--json", help="write the per-question scores here")
    parser.add_argument("--compare", help="a --json file of an earlier run, shown beside")
    args = parser.parse_args()
    configure_logging()
    with tempfile.TemporaryDirectory() as scratch:
        home = Home(Path(args.home) if args.home else Path(scratch))
        directory = prepare_demo_model(home.root / "models")
        model = TransformersChatModel.from_directory(
            directory, model_id=DEMO_MODEL_ID, digest=DEMO_MODEL_SHA256, tool_role="user",
            dtype=args.dtype,
            flags=cpu_flags() - frozenset(NATIVE_BF16_FLAGS) if args.without_native_bf16 else None)
        print(f"dtype: {model.dtype_choice.describe() if model.dtype_choice else args.dtype}")
        started = time.perf_counter()
        scores = score_all(model, home)
        seconds = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cpu": cpu_summary(), "dtype": args.dtype, "seconds": seconds,
             "scores": [{"question": s.question, "calls_right": s.calls_right,
                         "answer_right": s.answer_right, "turns": s.turns, "stop": s.stop,
                         "emitted": s.emitted, "answer": s.answer} for s in scores]},
            indent=1), encoding="utf-8")
    earlier = {}
    if args.compare:  # scored again with this scorer, from the calls and answers it kept
        by_text = {question.question: question for question in QUESTIONS}
        for old in json.loads(Path(args.compare).read_text(encoding="utf-8"))["scores"]:
            question = by_text[old["question"]]
            emitted = [(name, arguments) for name, arguments in old["emitted"]]
            earlier[old["question"]] = dict(
                old, calls_right=calls_right(question, emitted),
                answer_right=answer_right(question, old["stop"], old["answer"]))

    def mark(flag: bool) -> str:
        return "yes" if flag else "no"

    rows = []
    for s in scores:
        row: list[object] = [s.question[:48], mark(s.calls_right), mark(s.answer_right), s.turns]
        if earlier:
            old = earlier.get(s.question, {})
            row[1:1] = [mark(bool(old.get("calls_right")))]
            row[3:3] = [mark(bool(old.get("answer_right")))]
        rows.append(row)
    header = (["question", "calls (before)", "calls", "answer (before)", "answer", "turns"]
              if earlier else ["question", "calls", "answer", "turns"])
    print_table(f"Held-out questions, demo model {args.dtype}, greedy ({cpu_summary()})",
                header, rows)
    total = len(scores)
    summary = [("call accuracy", f"{sum(s.calls_right for s in scores)}/{total}"),
               ("answer accuracy", f"{sum(s.answer_right for s in scores)}/{total}"),
               ("model turns", str(sum(s.turns for s in scores))),
               ("seconds", f"{seconds:.0f}")]
    if earlier:
        olds = list(earlier.values())
        summary = [(name, f"{sum(bool(o[key]) for o in olds)}/{len(olds)} -> {value}")
                   if key else (name, value)
                   for (name, value), key in zip(
                       summary, ["calls_right", "answer_right", None, None], strict=True)]
    print_table("Summary (before -> after)" if earlier else "Summary", ["measure", "value"],
                summary)


if __name__ == "__main__":
    main()
