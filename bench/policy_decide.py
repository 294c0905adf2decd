"""
The whole policy stage per decision, for a realistic policy, against baselines
measured in the same process (run: .venv/bin/python -m bench.policy_decide).

The policy: the support team's example (policies/examples/support) grown to
60 Cedar policies (permits and forbids over roles, groups, labels, arguments
and context), 5 rate limits (sliding window and token bucket, state in an
SQLite file) and 2 flow rules, with 40 principals. Timed:

- ``Policy.decide``: bounds, JSON Schema, path constraints, Cedar, flows,
  rate limits (check and charge in SQLite), the Decision.
- baseline ``cedarpy alone``: ``cedarpy.is_authorized`` on the same parsed
  policy set and entities, with the same request.
- baseline ``jsonschema alone``: ``Draft202012Validator.iter_errors`` on the
  same arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import cedarpy
import structlog
from jsonschema import Draft202012Validator
from referencing import Registry

from bench._common import REPO, print_table, summarize, timed
from callward.core import CallContext, ToolCall, ToolRegistry
from callward.policies import Policy, PolicyState
from callward.policies._cedar import principal_entities

SUPPORT = REPO / "policies" / "examples" / "support"


def cedar_policies(count: int) -> str:
    """``count`` realistic Cedar policies, each with an @id; about a third are forbids."""
    out = []
    for n in range(count):
        kind = n % 6
        if kind == 0:
            out.append(f'@id("role-{n}") permit (principal in Role::"role-{n}", action, '
                       f'resource == Tool::"lookup_order");')
        elif kind == 1:
            out.append(f'@id("group-cap-{n}") forbid (principal in Group::"group-{n}", action, '
                       f'resource == Tool::"refund") when {{ context.arguments has amount_cents '
                       f'&& context.arguments.amount_cents > {1000 + n} }};')
        elif kind == 2:
            out.append(f'@id("label-{n}") permit (principal in Role::"role-{n}", action, '
                       f'resource) when {{ resource.labels.contains("read") }};')
        elif kind == 3:
            out.append(f'@id("hours-{n}") forbid (principal in Group::"group-{n}", action, '
                       f'resource) when {{ context.time.hour_utc < 2 && '
                       f'context.session_labels.contains("label-{n}") }};')
        elif kind == 4:
            out.append(f'@id("order-prefix-{n}") forbid (principal, action, resource == '
                       f'Tool::"lookup_order") when {{ context.arguments has order_id && '
                       f'context.arguments.order_id like "ORD-9{n:05d}" }};')
        else:
            out.append(f'@id("person-{n}") permit (principal == Principal::"agent-{n}", action, '
                       f'resource == Tool::"refund") when {{ context.arguments has amount_cents '
                       f'&& context.arguments.amount_cents <= 50000 }};')
    return "\n".join(out)


def build_policy(directory: Path, rules: int) -> Path:
    (directory / "support.cedar").write_text((SUPPORT / "support.cedar").read_text())
    (directory / "generated.cedar").write_text(cedar_policies(rules))
    principals = "\n".join(
        f"  agent-{n}: {{roles: [support, role-{n}], groups: [group-{n % 7}]}}" for n in range(40))
    (directory / "policy.yaml").write_text(f"""
version: 1
default: deny
principals:
{principals}
  lead-lena: {{roles: [team-lead]}}
rules:
  - {{id: support-looks-up-orders, effect: allow, roles: [support], tools: [lookup_order]}}
cedar: [support.cedar, generated.cedar]
tools:
  refund: {{output_labels: [payment-data]}}
rate_limits:
  - {{id: lookups-per-minute, tools: [lookup_order], limit: 100000000, window_seconds: 60,
     algorithm: token_bucket}}
  - {{id: lookups-per-session, tools: [lookup_order], per: [session], limit: 100000000,
     window_seconds: 3600, algorithm: token_bucket}}
  - {{id: reads-per-principal, labels: [read], per: [principal], limit: 100000000,
     window_seconds: 60, algorithm: token_bucket}}
  - {{id: refunds-per-hour, tools: [refund], per: [principal], limit: 10,
     window_seconds: 3600}}
  - {{id: payments-per-day, labels: [payments], limit: 100, window_seconds: 86400}}
flows:
  - {{id: no-payment-data-out, from: [payment-data], to: [egress]}}
  - {{id: no-secrets-out, from: [secret], to: [egress]}}
""")
    return directory / "policy.yaml"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--rules", type=int, default=60)
    args = parser.parse_args()
    # As the CLI configures it: info events are filtered out, as in production.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    registry = ToolRegistry()
    registry.load(SUPPORT / "tools.py")
    spec = registry.require("lookup_order")
    arguments = {"order_id": "ORD-000042"}
    call = ToolCall.create(id="c1", name="lookup_order", arguments=arguments, dialect="api")
    context = CallContext("agent-0", "session-1")

    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        policy = Policy.from_file(build_policy(directory, args.rules),
                                  state=PolicyState(directory / "policy-state.db"))
        assert policy.decide(call, spec, context).effect == "allow"
        cedar_count = policy.cedar_text.count("@id(")

        policies = cedarpy.PolicySet.from_str(policy.cedar_text)
        entities = cedarpy.Entities.from_json_str(json.dumps(
            [*principal_entities(policy.document),
             {"uid": {"type": "Tool", "id": "lookup_order"}, "attrs": {"labels": ["read"]},
              "parents": []}]))
        request = {"principal": {"type": "Principal", "id": "agent-0"},
                   "action": {"type": "Action", "id": "Call"},
                   "resource": {"type": "Tool", "id": "lookup_order"},
                   "context": {"arguments": arguments, "session_id": "session-1",
                               "session_labels": [], "time": {"epoch_seconds": 1,
                                                              "hour_utc": 12, "weekday_utc": 2}}}
        assert cedarpy.is_authorized(request, policies, entities).allowed
        validator = Draft202012Validator(spec.parameters, registry=Registry(),
                                         format_checker=Draft202012Validator.FORMAT_CHECKER)

        for function in (lambda: policy.decide(call, spec, context),
                         lambda: cedarpy.is_authorized(request, policies, entities),
                         lambda: list(validator.iter_errors(arguments))):
            timed(function, 300)  # warm-up
        started = time.perf_counter()
        decide = timed(lambda: policy.decide(call, spec, context), args.decisions)
        elapsed = time.perf_counter() - started
        cedar = timed(lambda: cedarpy.is_authorized(request, policies, entities),
                      args.decisions)
        schema = timed(lambda: list(validator.iter_errors(arguments)), args.decisions)
        explain = timed(lambda: policy.explain(call, spec, context), args.decisions)
        policy.state.close()

    rows = []
    for name, samples in (
        ("Policy.decide (whole policy stage, rate limits charged)", decide),
        ("Policy.explain (same checks, no state written)", explain),
        ("baseline: cedarpy.is_authorized alone", cedar),
        ("baseline: jsonschema iter_errors alone", schema),
    ):
        p50, p99, mean = summarize(samples)
        rows.append((name, p50, p99, round(1000 / mean)))
    print_table(
        f"Policy stage per decision: {cedar_count} Cedar policies, 5 rate limits, 2 flow rules, "
        f"{args.decisions} decisions ({args.decisions / elapsed:,.0f} decisions/s for decide)",
        ("what", "p50 ms", "p99 ms", "per second"),
        rows,
    )


if __name__ == "__main__":
    main()
