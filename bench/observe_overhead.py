"""
What observing costs per call: the Prometheus metrics and the anomaly detector, and a
policy gate that reads the anomaly state, against the same gateway without them, all
in one process (run: .venv/bin/python -m bench.observe_overhead).

The sandbox is left out (``NullRunner`` answers at once), so the ratio is against
governance alone, the smallest denominator a call can have; with a real container
(~5 ms warm) the same absolute cost is a far smaller share. The configurations are
measured in interleaved rounds so a busy machine slows each of them alike.

The detector's clock advances one second per call, so its baselines fill up and every
check runs (6 buckets of history after 60 calls); the traffic stays normal, so what is
timed is the common path that records nothing.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._common import EXAMPLES, NullRunner, configure_logging, print_table, summarize, timed
from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import ToolRegistry
from callward.core.gateway import Gateway
from callward.core.observe._anomaly import AnomalyDetector
from callward.core.observe._events import CallEvent, CallObserver
from callward.core.observe._metrics import Metrics
from callward.policies import Policy
from callward.policies._anomaly_state import AnomalyState

TEXT = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'
GATE = """
anomalies:
  - {id: hold-anomalous, effect: deny, tools: ["*"], metrics: [call_rate, denial_ratio]}
"""


class SteppingClock:
    """One second later at each reading: spaced, normal traffic for the detector."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now



def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dir", default=None,
                        help="where the logs go, e.g. /dev/shm to take fsync noise out")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        root = Path(directory)
        registry = ToolRegistry()
        registry.load(EXAMPLES / "tools.py")
        signer = FileSigner.load_or_create(root / "keys")
        policy_text = (EXAMPLES / "policy.yaml").read_text(encoding="utf-8")
        closers: list[Callable[[], None]] = []

        def gateway(name: str, *, metrics: bool, detector: bool, gate: bool) -> Gateway:
            store = SQLiteAuditStore(root / f"{name}.db", signer)
            store.open()
            state = AnomalyState(root / f"{name}-anomalies.db")
            closers.extend((store.close, state.close))
            observers: list[CallObserver] = []
            collected = Metrics() if metrics else None
            if collected is not None:
                observers.append(collected)
            if detector:
                observers.append(AnomalyDetector(state, store, clock=SteppingClock(),
                                                 metrics=collected))
            policy = Policy.from_text(policy_text + (GATE if gate else ""),
                                      anomalies=state if gate else None)
            return Gateway(registry=registry, policy=policy, runner=NullRunner(), audit=store,
                           observers=tuple(observers))

        configurations = {
            "gateway, no observers (baseline)": gateway("base", metrics=False, detector=False,
                                                        gate=False),
            "+ Prometheus metrics": gateway("metrics", metrics=True, detector=False,
                                            gate=False),
            "+ metrics + anomaly detector": gateway("detector", metrics=True, detector=True,
                                                    gate=False),
            "+ metrics + detector + policy gate": gateway("gate", metrics=True, detector=True,
                                                          gate=True),
        }
        for each in configurations.values():
            for _ in range(200):  # warm-up
                each.handle_text(TEXT, principal="alice")
        samples: dict[str, list[float]] = {name: [] for name in configurations}
        per_round = max(1, args.calls // args.rounds)
        for _, (name, each) in itertools.product(range(args.rounds), configurations.items()):
            samples[name] += timed(lambda each=each: each.handle_text(TEXT, principal="alice"),
                                   per_round)

        # The observers alone, on a ready-made event: their cost without the gateway's noise.
        event = CallEvent(call_id="c", principal="alice", tool="add", outcome="ok",
                          record_kind="call.completed", result_bytes=2,
                          durations_ms=(("parse", 0.01), ("policy", 0.05),
                                        ("audit_authorized", 0.1), ("sandbox", 0.01),
                                        ("queue", 0.0), ("audit_completed", 0.1)))
        alone_store = SQLiteAuditStore(root / "alone.db", signer)
        alone_store.open()
        alone_state = AnomalyState(root / "alone-anomalies.db")
        closers.extend((alone_store.close, alone_state.close))
        metrics = Metrics()
        detector = AnomalyDetector(alone_state, alone_store, clock=SteppingClock())
        alone = {"Metrics.observe alone": timed(lambda: metrics.observe(event), args.calls),
                 "AnomalyDetector.observe alone": timed(lambda: detector.observe(event),
                                                        args.calls),
                 "policy gate read (open_for) alone": timed(
                     lambda: alone_state.open_for("alice", time.time()), args.calls)}
        for close in closers:
            close()

    base50, _, base_mean = summarize(samples["gateway, no observers (baseline)"])
    rows = []
    for name, values in samples.items():
        p50, p99, mean = summarize(values)
        rows.append((name, p50, p99, mean, (mean - base_mean) * 1000, f"{p50 / base50:.3f}"))
    for name, values in alone.items():
        p50, p99, mean = summarize(values)
        rows.append((name, p50, p99, mean, mean * 1000, f"{p50 / base50:.4f} (share)"))
    print_table(
        f"Observing cost per call ({per_round * args.rounds} calls per configuration, "
        f"{args.rounds} interleaved rounds, one process, 1 thread, NullRunner)",
        ["path", "p50 ms", "p99 ms", "mean ms", "added mean us", "p50 / baseline p50"],
        rows,
    )


if __name__ == "__main__":
    main()
