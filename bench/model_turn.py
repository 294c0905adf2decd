"""
The demo model on this machine: load time (cold converts the GGUF, warm reads the
bf16 cache), tokens per second, time per turn, peak memory, the share of a run
spent outside the model, and how many demo questions it answers correctly.

Run: .venv/bin/python -m bench.model_turn [--home DIR]   (needs the Docker Engine)

Baseline, in the same process: the same model turns generated directly (template
+ ``generate``), with no parsing, policy, sandbox or audit around them.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from bench._common import configure_logging, print_table
from callward.core.agent import Agent
from callward.core.cli._demo import QUESTIONS
from callward.core.gateway import Gateway
from callward.core.gateway._config import Home, example_config_path
from callward.core.models import ChatMessage
from callward.core.models._gguf import load_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", help="CALLWARD_HOME whose models/ cache to use "
                        "(default: a fresh temporary one, so the first load is cold)")
    args = parser.parse_args()
    configure_logging()
    with tempfile.TemporaryDirectory() as scratch:
        home = Home(Path(args.home) if args.home else Path(scratch))
        run(home)


def run(home: Home) -> None:
    started = time.perf_counter()
    model = load_demo_model(home.root / "models")
    first_load = time.perf_counter() - started
    started = time.perf_counter()
    model = load_demo_model(home.root / "models")
    warm_load = time.perf_counter() - started

    rows = []
    model_seconds = run_seconds = 0.0
    turns = tokens = correct = 0
    baseline_seconds = 0.0
    baseline_tokens = 0
    with Gateway.from_config(example_config_path(), home=home.root) as gateway:
        for item in QUESTIONS:
            agent = Agent(gateway=gateway, model=model, principal=item.principal)
            result = agent.run(item.question)
            correct += item.correct(result)
            run_seconds += result.seconds
            for step in result.steps:
                model_seconds += step.turn.duration_seconds
                tokens += step.turn.output_tokens
                turns += 1
            # Baseline: the first turn again, straight from the model.
            messages = [ChatMessage("system", agent.system_prompt),
                        ChatMessage("user", item.question)]
            baseline = model.generate(messages, agent.tool_schemas())
            baseline_seconds += baseline.duration_seconds
            baseline_tokens += baseline.output_tokens
            first = result.steps[0].turn
            rows.append((item.question[:32], len(result.steps), first.prompt_tokens,
                         first.output_tokens, first.duration_seconds, baseline.duration_seconds,
                         result.seconds, "yes" if item.correct(result) else "no"))
    outside = max(run_seconds - model_seconds, 0.0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print_table(
        "Demo questions (bf16, greedy; seconds)",
        ["question", "turns", "prompt tok", "output tok", "turn 1 via agent",
         "turn 1 bare model", "run total", "correct"],
        rows,
    )
    print_table(
        "Summary",
        ["measure", "value"],
        [
            ("first load (s; cold = GGUF convert)", first_load),
            ("warm load (s; verify chunks + bf16 cache)", warm_load),
            ("tokens/s via agent", tokens / model_seconds if model_seconds else 0.0),
            ("tokens/s bare model (baseline)",
             baseline_tokens / baseline_seconds if baseline_seconds else 0.0),
            ("mean time per turn (s)", model_seconds / turns if turns else 0.0),
            ("outside the model (% of run time)", 100 * outside / run_seconds),
            ("outside the model per turn (ms)", 1000 * outside / turns if turns else 0.0),
            ("peak RSS (MiB)", peak_mib),
            ("answered correctly with tools", f"{correct}/{len(QUESTIONS)}"),
        ],
    )


if __name__ == "__main__":
    main()
