"""
The demo model's turns on this CPU, per dtype, with and without the prefix cache.

Six ways of running the same demo questions through the agent and the real gateway,
interleaved question by question in one process:

- ``bf16, full prompt``: the code before issue 17, the baseline (bfloat16 whatever the
  CPU, every prompt computed in full);
- ``bf16, prefix cached``: bfloat16 with the shared prefix (system prompt and tools) kept;
- ``fp32, full prompt`` and ``fp32, prefix cached``: the same in float32, the dtype
  ``auto`` picked on a CPU without bfloat16 arithmetic (AVX2 only, as the issue's
  reporter's) until it measured the last way faster there; on a CPU with it, these rows
  show float32's cost, not an AVX2 machine's;
- ``fp32, prefix cached, output-major weights``: the float32 model with its widening
  linear weights left as stored (``store_for_decoding`` undone), the baseline of that
  layout change;
- ``bf16, prefix cached, float32 prompts``: bfloat16 set explicitly as on a CPU without
  bfloat16 arithmetic (the flags passed without ``avx512_bf16``/``amx_bf16``): products
  of several rows in float32 from exact float32 copies of the weights, one-row decoding
  products in bfloat16 (``prompts_in_float32``): what ``auto`` chooses on an AVX2 CPU
  without bfloat16 arithmetic.

The way ``auto`` chooses with the flags the models are given is marked ``(auto)``.

Per way: demo turn p50 and mean, the first turn of a question once the prefix is warm,
output tokens per second, and the demo's answers (which must agree: cached turns are the
uncached turns token for token). Printed with the CPU's model name and flags, the dtype
``auto`` chooses here, torch's threads and the load average before and after.

Run: .venv/bin/python -m bench.model_turn [--home DIR] [--rounds N] [--isa avx2]
(needs the Docker Engine). ``--isa avx2`` caps torch, oneDNN and MKL at AVX2 before
torch loads (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``),
so bfloat16 is emulated as on the reporter's CPU, and gives the models that CPU's flags
(without ``avx512_bf16``/``amx_bf16``): an approximation of such a machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import configure_logging, percentile, print_table
from callward.core.models._cpu import (
    NATIVE_BF16_FLAGS,
    REPORTED_FLAGS,
    choose_dtype,
    cpu_flags,
    cpu_model_name,
    usable_cpus,
)

OUTPUT_MAJOR = "float32, output-major"
FLOAT32_PROMPTS = "bfloat16, float32 prompts"
ISA_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


@dataclass
class Way:
    """One way of running the questions, and what it measured."""

    name: str
    model: str
    cached: bool
    turns: list[float] = field(default_factory=list)
    first_turns: list[float] = field(default_factory=list)
    tokens: int = 0
    correct: int = 0
    runs: int = 0
    outside_seconds: float = 0.0
    answers: list[str] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", help="CALLWARD_HOME whose models/ cache to use "
                        "(default: a fresh temporary one, so the first load converts)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times each way answers the demo questions (default 2)")
    parser.add_argument("--questions", type=int, default=4,
                        help="how many of the demo's questions (default all 4)")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS),
                        help="cap the instruction set torch uses (before it loads)")
    args = parser.parse_args()
    if args.isa:
        os.environ.update(ISA_CAPS[args.isa])
    configure_logging()
    with tempfile.TemporaryDirectory() as scratch:
        run(Path(args.home) if args.home else Path(scratch), rounds=args.rounds,
            questions=args.questions, isa=args.isa)


def _rss_mib() -> float:
    import psutil  # noqa: PLC0415 - bench only

    return float(psutil.Process().memory_info().rss) / (1 << 20)


def run(home: Path, *, rounds: int, questions: int, isa: str | None) -> None:  # noqa: PLR0915
    from callward.core.agent import Agent  # noqa: PLC0415
    from callward.core.cli._demo import QUESTIONS  # noqa: PLC0415
    from callward.core.gateway import Gateway  # noqa: PLC0415
    from callward.core.gateway._config import example_config_path  # noqa: PLC0415
    from callward.core.models._chat import ChatMessage, PrefixCache  # noqa: PLC0415
    from callward.core.models._gguf import load_demo_model  # noqa: PLC0415

    flags = cpu_flags()
    without_bf16 = flags - frozenset(NATIVE_BF16_FLAGS)
    model_flags = without_bf16 if isa else flags
    load_before = os.getloadavg()
    print(f"CPU: {cpu_model_name()}, {usable_cpus()} usable CPUs; "
          + ", ".join(f"{flag}: {'yes' if flag in flags else 'no'}" for flag in REPORTED_FLAGS))
    print(f"dtype auto chooses here: {choose_dtype(model_flags).describe()}"
          + (f"; instruction set capped at {isa} for torch, models given the flags "
             "without bfloat16 arithmetic" if isa else ""))
    print(f"load average at start: {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}")

    models_dir = home / "models"
    started = time.perf_counter()
    load_demo_model(models_dir, prefix_cache_entries=0)  # converts on a cold cache
    first_load = time.perf_counter() - started
    models = {}
    loads = {}
    # The bfloat16 ways are bfloat16 as before issue 17 (emulated under the cap): this
    # CPU's own flags, with which a set bfloat16 computes prompts in bfloat16 too.
    for key, dtype, given in (("bfloat16", "bfloat16", flags),
                              ("float32", "float32", model_flags),
                              (FLOAT32_PROMPTS, "bfloat16", without_bf16)):
        rss = _rss_mib()
        started = time.perf_counter()
        models[key] = load_demo_model(models_dir, dtype=dtype, flags=given)
        loads[key] = (time.perf_counter() - started, _rss_mib() - rss)
    import torch  # noqa: PLC0415 - loaded with the models

    models[OUTPUT_MAJOR] = load_demo_model(models_dir, dtype="float32")
    for module in models[OUTPUT_MAJOR].model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.contiguous()

    print(f"torch {torch.__version__}: {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")

    ways = [Way("bf16, full prompt (before #17)", "bfloat16", cached=False),
            Way("bf16, prefix cached", "bfloat16", cached=True),
            Way("fp32, full prompt", "float32", cached=False),
            Way("fp32, prefix cached", "float32", cached=True),
            Way("fp32, prefix cached, output-major weights", OUTPUT_MAJOR, cached=True),
            Way("bf16, prefix cached, float32 prompts", FLOAT32_PROMPTS, cached=True)]
    auto = choose_dtype(model_flags)
    auto_model = FLOAT32_PROMPTS if auto.prompts_in_float32 else auto.dtype
    auto_way = next(way for way in ways if way.model == auto_model and way.cached)
    auto_way.name += " (auto)"
    caches = {dtype: PrefixCache(4) for dtype in models}
    asked = QUESTIONS[:questions]
    with Gateway.from_config(example_config_path(), home=home / "gateway") as gateway:
        # Warm-up, not measured: each principal's prefix kept for the cached ways (one
        # prefill each, no generation), so every measured first turn finds it warm.
        rss = _rss_mib()
        for key, model in models.items():
            model.prefix_cache = caches[key]
            for principal in sorted({item.principal for item in asked}):
                agent = Agent(gateway=gateway, model=model, principal=principal)
                messages = [ChatMessage("system", agent.system_prompt),
                            ChatMessage("user", "warm-up")]
                tools = agent.tool_schemas()
                prompt = model.render(messages, tools)
                ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                prefix = model.shared_prefix(messages, tools, prompt, ids)
                with torch.inference_mode():
                    model._prefix_cache_for(torch, prefix)
        warm_rss = _rss_mib() - rss
        for number in range(rounds):
            for item in asked:
                print(f"round {number + 1}: {item.question}", flush=True)
                for way in ways:
                    model = models[way.model]
                    model.prefix_cache = caches[way.model] if way.cached else PrefixCache(0)
                    result = Agent(gateway=gateway, model=model,
                                   principal=item.principal).run(item.question)
                    way.runs += 1
                    way.correct += item.correct(result)
                    way.answers.append(result.answer or "")
                    way.first_turns.append(result.steps[0].turn.duration_seconds)
                    way.outside_seconds += result.seconds - sum(
                        step.turn.duration_seconds for step in result.steps)
                    for step in result.steps:
                        way.turns.append(step.turn.duration_seconds)
                        way.tokens += step.turn.output_tokens
    load_after = os.getloadavg()

    baseline = statistics.median(ways[0].turns)
    rows = []
    for way in ways:
        p50 = statistics.median(way.turns)
        first_p50 = statistics.median(way.first_turns)
        rows.append((way.name, len(way.turns), p50, percentile(way.turns, 0.9),
                     statistics.fmean(way.turns), first_p50,
                     way.tokens / sum(way.turns), 1000 * way.outside_seconds / len(way.turns),
                     f"{baseline / p50:.2f}x",
                     f"{way.correct}/{way.runs}"))
    print_table(
        f"Demo turns through the agent and gateway ({rounds} rounds of {len(asked)} "
        "questions; seconds; ratio = baseline p50 / p50)",
        ["way", "turns", "turn p50", "turn p90", "turn mean", "first turn p50 (prefix warm)",
         "output tok/s", "outside the model (ms/turn)", "vs before #17", "correct"],
        rows,
    )
    same = {way.name: way.answers == ways[0].answers for way in ways
            if way.model == ways[0].model}
    same_fp32 = ways[2].answers == ways[3].answers
    same_layout = ways[3].answers == ways[4].answers
    print_table(
        "Summary",
        ["measure", "value"],
        [
            ("first load (s; a cold cache converts the GGUF)", first_load),
            ("load bf16 (s) / its RSS growth (MiB)", f"{loads['bfloat16'][0]:.2f} / "
                                                    f"{loads['bfloat16'][1]:.0f}"),
            ("load fp32 (s; cast from the bf16 copy) / its RSS growth (MiB)",
             f"{loads['float32'][0]:.2f} / {loads['float32'][1]:.0f}"),
            ("load bf16 with float32 prompts (s) / its RSS growth (MiB)",
             f"{loads[FLOAT32_PROMPTS][0]:.2f} / {loads[FLOAT32_PROMPTS][1]:.0f}"),
            ("RSS growth in the warm-up, all models (MiB; float32 prompt copies made)",
             f"{warm_rss:.0f}"),
            ("peak RSS, all models loaded (MiB)",
             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            ("cached answers = full-prompt answers (bf16 / fp32)",
             f"{all(same.values())} / {same_fp32}"),
            ("fp32 answers, input-major = output-major weights", f"{same_layout}"),
            ("bf16 answers, float32 prompts = bf16 prompts",
             f"{ways[1].answers == ways[5].answers}"),
            ("prefix cache hits bf16 / fp32 / bf16 float32 prompts",
             f"{caches['bfloat16'].hits} / {caches['float32'].hits} / "
             f"{caches[FLOAT32_PROMPTS].hits}"),
            ("load average at start / end (1 min)", f"{load_before[0]:.2f} / "
                                                    f"{load_after[0]:.2f}"),
        ],
    )


if __name__ == "__main__":
    main()
