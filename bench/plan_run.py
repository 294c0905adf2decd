"""
The news-summary plan end to end (core/examples/plans/news_summary.yaml): two
searches in parallel, cleanup, summary, every step a call through the gateway
(policy, signed call.authorized, a fresh hardened container, signed
call.completed), plus the plan.started/plan.completed records.

Printed: the plan's wall time; per step its time and the share spent in
callward itself (the step's time minus the sandbox time its call.completed
record gives); the plan's own overhead (wall time minus the critical path of
the steps). Baselines in the same process: the same four calls through
``gateway.handle`` back to back (no plan), and the plan with max_parallel=1.

Each measured run starts with the warm pool refilled (one ready container per
step; the example configuration keeps four), so the figures are warm-path
figures; runs back to back without waiting are bounded by the pool's refill
rate instead (a cold container start, ~0.5-1 s on a busy machine).

Run: .venv/bin/python -m bench.plan_run --runs 20
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench._common import EXAMPLES, configure_logging, print_table, summarize
from callward.core import ResourceLimits, ToolCall
from callward.core._canonical import canonical_loads
from callward.core.gateway import Gateway
from callward.core.plans import Plan, PlanReport, load_plan, run_plan
from callward.core.plans._document import substitute

EXAMPLE = EXAMPLES / "plans"


def durations_ms(gateway: Gateway, seq: int) -> dict[str, float]:
    """The stage durations the call.completed record at ``seq`` carries."""
    record = gateway.audit.get(seq)  # type: ignore[attr-defined]
    return {stage: float(value) for stage, value in record.body["durations_ms"].items()}


def refill(gateway: Gateway, steps: int) -> None:
    """Wait until the warm pool holds a container for every step (steady state: warm)."""
    if not gateway.runner.wait_warm(ResourceLimits(), steps):  # type: ignore[attr-defined]
        raise SystemExit("the warm pool did not refill")


def back_to_back(gateway: Gateway) -> float:
    """The plan's four calls through gateway.handle one after another, refs resolved by hand."""
    plan = load_plan(EXAMPLE / "news_summary.yaml")
    outputs: dict[str, object] = {}
    start = time.perf_counter()
    for step_id in plan.order:
        step = plan.step(step_id)
        values = {pointer: ref.resolve(outputs[ref.step]) for pointer, ref in step.refs}  # type: ignore[arg-type]
        arguments = substitute(step.arguments, values)
        call = ToolCall.create(id=gateway.new_id(), name=step.tool, arguments=arguments,  # type: ignore[arg-type]
                               dialect="api")
        result = gateway.handle(call, principal="editor")
        if result.kind != "ok":
            raise SystemExit(f"baseline step {step_id} ended {result.kind}")
        outputs[step_id] = canonical_loads(result.content_json)
    return (time.perf_counter() - start) * 1000


class Samples:
    """Every figure the benchmark collects, in milliseconds (share in percent)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.wall: list[float] = []
        self.serial_wall: list[float] = []
        self.baseline: list[float] = []
        self.overhead: list[float] = []
        self.share: list[float] = []
        self.steps: dict[str, dict[str, list[float]]] = {
            s: {"total": [], "sandbox": [], "callward (total - sandbox)": []} for s in plan.order}
        self.stages: dict[str, list[float]] = {
            "policy": [], "audit_authorized": [], "audit_completed+result rules+refs": []}

    def add_run(self, gateway: Gateway, report: PlanReport, wall_ms: float) -> None:
        """One plan run: per step, per stage, the overhead and callward's share."""
        self.wall.append(wall_ms)
        finish: dict[str, float] = {}
        callward = 0.0
        for step_id in self.plan.order:
            outcome = report.outcome(step_id)
            if outcome.receipt is None:
                raise SystemExit(f"step {step_id} has no receipt")
            durations = durations_ms(gateway, outcome.receipt.seq)
            for stage in ("policy", "audit_authorized"):
                self.stages[stage].append(durations[stage])
            self.stages["audit_completed+result rules+refs"].append(
                outcome.wall_ms - sum(durations.values()))
            step = self.steps[step_id]
            step["total"].append(outcome.wall_ms)
            step["sandbox"].append(durations["sandbox"])
            step["callward (total - sandbox)"].append(outcome.wall_ms - durations["sandbox"])
            callward += outcome.wall_ms - durations["sandbox"]
            finish[step_id] = outcome.wall_ms + max(
                (finish[d] for d in self.plan.step(step_id).depends_on), default=0.0)
        self.overhead.append(wall_ms - max(finish.values()))
        self.share.append(100 * (callward + self.overhead[-1]) / wall_ms)


def measure(gateway: Gateway, plan: Plan, runs: int) -> Samples:
    samples = Samples(plan)
    run_plan(gateway, plan, principal="editor")  # warm-up: pool, imports, caches
    back_to_back(gateway)
    for _ in range(runs):
        refill(gateway, len(plan.steps))
        start = time.perf_counter()
        report = run_plan(gateway, plan, principal="editor")
        wall_ms = (time.perf_counter() - start) * 1000
        if not report.ok:
            raise SystemExit("the plan did not end ok")
        samples.add_run(gateway, report, wall_ms)
        refill(gateway, len(plan.steps))
        start = time.perf_counter()
        run_plan(gateway, plan, principal="editor", max_parallel=1)
        samples.serial_wall.append((time.perf_counter() - start) * 1000)
        refill(gateway, len(plan.steps))
        samples.baseline.append(back_to_back(gateway))
    return samples


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    plan = load_plan(EXAMPLE / "news_summary.yaml")
    with (tempfile.TemporaryDirectory() as home,
          Gateway.from_config(EXAMPLE / "callward.yaml", home=home) as gateway):
        samples = measure(gateway, plan, args.runs)

    rows: list[tuple[object, ...]] = [("plan wall (max_parallel 4)", *summarize(samples.wall))]
    for step_id, parts in samples.steps.items():
        rows.extend((f"step {step_id}: {part}", *summarize(values))
                    for part, values in parts.items())
    rows.extend((f"any step: {stage}", *summarize(values))
                for stage, values in samples.stages.items())
    rows.append(("plan overhead (wall - critical path of steps)", *summarize(samples.overhead)))
    rows.append(("plan wall (max_parallel 1)", *summarize(samples.serial_wall)))
    rows.append(("baseline: the 4 calls via gateway.handle back to back",
                 *summarize(samples.baseline)))
    print_table(f"news-summary plan, {args.runs} runs (warm pool refilled before each run)",
                ["what", "p50 ms", "p99 ms", "mean ms"], rows)
    print(f"\ncallward's share of the plan wall time (steps minus sandbox, plus plan overhead):"
          f" p50 {summarize(samples.share)[0]:.1f} %")
    baseline = summarize(samples.baseline)[0]
    print(f"plan (max_parallel 4) p50 / back-to-back gateway calls p50 = "
          f"{summarize(samples.wall)[0] / baseline:.2f}")
    print(f"plan (max_parallel 1) p50 / back-to-back gateway calls p50 = "
          f"{summarize(samples.serial_wall)[0] / baseline:.2f}")


if __name__ == "__main__":
    main()
