"""
End-to-end latency of one allowed call through the whole path (parse, policy,
signed call.authorized, a fresh hardened container, signed call.completed),
per stage, against `docker run --rm` of the same image in the same process.

Run: .venv/bin/python -m bench.call_latency --calls 60
Stage times come from the durations each call.completed record carries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time

from bench._common import configure_logging, print_table, summarize
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path
from callward.sandbox import expected_image_tag


def docker_run_baseline(count: int) -> list[float]:
    """
    `docker run --rm -i` of the same image and runner with the same request on stdin,
    network none and no other limits, as a user would type it.
    """
    request = json.dumps({"source": "def square(x):\n    return x * x\n",
                          "entrypoint": "square", "arguments": {"x": 3}})
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        done = subprocess.run(
            ["docker", "run", "--rm", "-i", "--network", "none", expected_image_tag()],
            check=True, capture_output=True, input=request.encode(),
        )
        samples.append((time.perf_counter() - start) * 1000)
        if b'"value":9' not in done.stdout:
            raise SystemExit(f"baseline gave {done.stdout!r}")
    return samples


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--baseline-runs", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        with Gateway.from_config(example_config_path(), home=home) as gateway:
            gateway.handle_text('call function("square", [1])', principal="alice")  # warm-up
            wall: list[float] = []
            stages: dict[str, list[float]] = {}
            for number in range(args.calls):
                start = time.perf_counter()
                (result,) = gateway.handle_text(
                    f'call function("square", [{number}])', principal="alice"
                )
                wall.append((time.perf_counter() - start) * 1000)
                if result.kind != "ok":
                    raise SystemExit(f"call {number} ended {result.kind}")
                completed = gateway.audit.get(result.receipt.seq)  # type: ignore[attr-defined]
                for stage, value in completed.body["durations_ms"].items():
                    stages.setdefault(stage, []).append(float(value))
                stages.setdefault("audit_completed+rest", []).append(
                    wall[-1] - sum(float(v) for v in completed.body["durations_ms"].values())
                )
        baseline = docker_run_baseline(args.baseline_runs)

    rows = []
    for stage in ("parse", "policy", "audit_authorized", "sandbox", "audit_completed+rest"):
        rows.append((stage, *summarize(stages[stage])))
    rows.append(("end to end (callward, default warm pool of 2, back to back)", *summarize(wall)))
    rows.append(("baseline: docker run --rm (no limits, no audit)", *summarize(baseline)))
    print_table(
        f"One allowed call, {args.calls} calls (baseline {args.baseline_runs} runs)",
        ["stage", "p50 ms", "p99 ms", "mean ms"],
        rows,
    )
    ratio = summarize(wall)[0] / summarize(baseline)[0]
    print(f"\ncallward end-to-end p50 / docker run --rm p50 = {ratio:.2f}")


if __name__ == "__main__":
    main()
