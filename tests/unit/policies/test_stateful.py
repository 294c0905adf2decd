"""
Stateful rules through the real gateway: rate limits, data-flow labels, result
rules, path confinement, bounds and hot reload, each audited in a real signed
SQLite log. The sandbox is a stand-in (Stub*) that returns canned results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from callward.audit import FileSigner, SQLiteAuditStore
from callward.core import (
    CallContext,
    Execution,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolSpec,
    Usage,
    canonical_bytes,
)
from callward.core.gateway import Gateway
from callward.core.protocols import PolicyHooks
from callward.policies import Policy, PolicyState

POLICY = """
version: 1
default: deny
principals:
  ana: {roles: [agent]}
rules:
  - {id: agents-use-everything, effect: allow, roles: [agent], tools: ["*"]}
tools:
  read_file:
    output_labels: [secret]
    confine: {root: /workspace, arguments: [path]}
rate_limits:
  - {id: posts-per-minute, tools: [http_post], limit: 2, window_seconds: 60}
  - {id: refunds-bucket, tools: [refund], limit: 2, window_seconds: 10,
     algorithm: token_bucket, per: [principal]}
flows:
  - {id: no-secret-egress, from: [secret], to: [egress]}
results:
  - {id: redact-credentials, tools: ["*"], redact: [credentials]}
  - {id: keep-file-bodies, tools: [read_file], audit_body: body}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class StubRunner:
    """Returns the canned value for a tool, as a real sandbox would return a tool's value."""

    def __init__(self, values) -> None:
        self.values = values
        self.runs = 0

    @property
    def image_digest(self) -> Sha256Hex:
        return Sha256Hex("cd" * 32)

    def run(self, spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
        self.runs += 1
        return Execution("ok", canonical_bytes(self.values.get(spec.name, "done")), "",
                         Usage(1.0, 0, 4))


@pytest.fixture(name="clock")
def _clock():
    return Clock()


@pytest.fixture(name="store")
def _store(tmp_path: Path):
    store = SQLiteAuditStore(tmp_path / "audit.db", FileSigner.load_or_create(tmp_path / "keys"))
    store.open()
    yield store
    store.close()


@pytest.fixture(name="policy_file")
def _policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture(name="make_policy")
def _make_policy(tmp_path, policy_file, clock):
    def make() -> Policy:
        return Policy.from_file(policy_file, state=PolicyState(tmp_path / "policy-state.db"),
                                clock=clock)
    return make


@pytest.fixture(name="gateway")
def _gateway(registry, make_policy, store):
    runner = StubRunner({
        "read_file": "AWS key AKIAABCDEFGHIJKLMNOP in .env",
        "http_post": {"status": 200, "token": "Bearer abcdefghijklmnopqrstuvwxyz012345"},
    })
    return Gateway(registry=registry, policy=make_policy(), runner=runner, audit=store)


def call(gateway, name, arguments, session="s1"):
    return gateway.handle(ToolCall.create(id=f"c-{name}", name=name, arguments=arguments,
                                          dialect="api"), principal="ana", session_id=session)


class TestRateLimits:
    def test_sliding_window_denies_past_the_limit_and_recovers(self, gateway, clock, store):
        """Two posts a minute: the third is denied as rate_limit; a minute later one runs."""
        results = [call(gateway, "http_post", {"url": "https://x"}) for _ in range(3)]

        assert ["ok", "ok", "rate_limit"] == [r.kind for r in results]
        assert "posts-per-minute" == results[2].content["rule"]
        assert "call.denied" == store.last().kind
        clock.now += 61
        assert "ok" == call(gateway, "http_post", {"url": "https://x"}).kind

    def test_state_survives_a_restart(self, registry, make_policy, clock):
        """A new Policy on the same state file still sees the calls already counted."""
        first = make_policy()
        spec = registry.get("refund")
        arguments = {"order_id": "A-1", "amount_cents": 5}
        for n in range(2):
            refund = ToolCall.create(id=f"r{n}", name="refund", arguments=arguments,
                                     dialect="api")
            assert "allow" == first.decide(refund, spec, CallContext("ana")).effect
        first.state.close()
        again = ToolCall.create(id="r3", name="refund", arguments=arguments, dialect="api")

        decision = make_policy().decide(again, spec, CallContext("ana"))

        assert ("rate_limit", ("refunds-bucket",)) == (decision.kind, decision.reasons)

    def test_token_bucket_refills_with_time(self, registry, make_policy, clock):
        """Two tokens per 10 s: a token is back after 5 s, not before."""
        policy = make_policy()
        spec = registry.get("refund")

        def decide(n):
            refund = ToolCall.create(id=f"r{n}", name="refund",
                                     arguments={"order_id": "A", "amount_cents": 1}, dialect="api")
            return policy.decide(refund, spec, CallContext("ana")).effect

        assert ["allow", "allow", "deny"] == [decide(n) for n in range(3)]
        clock.now += 4.9
        assert "deny" == decide(4)
        clock.now += 0.2
        assert "allow" == decide(5)

    def test_a_denied_call_takes_no_token(self, registry, make_policy):
        """Calls denied by an earlier check do not use up the rate limit."""
        policy = make_policy()
        spec = registry.get("refund")
        bad = ToolCall.create(id="b", name="refund", arguments={"order_id": "a"}, dialect="api")
        for _ in range(5):
            assert "schema" == policy.decide(bad, spec, CallContext("ana")).kind
        good = ToolCall.create(id="g", name="refund",
                               arguments={"order_id": "A", "amount_cents": 1}, dialect="api")

        assert "allow" == policy.decide(good, spec, CallContext("ana")).effect


class TestFlowLabels:
    def test_secret_output_cannot_reach_an_egress_tool_in_the_session(self, gateway, store):
        """After a result labelled secret, an egress tool in the same session is denied as flow."""
        assert "ok" == call(gateway, "http_post", {"url": "https://x"}).kind
        assert "ok" == call(gateway, "read_file", {"path": "notes/.env"}).kind

        denied = call(gateway, "http_post", {"url": "https://x", "body": "hello"})

        assert ("flow", "no-secret-egress") == (denied.kind, denied.content["rule"])
        assert "call.denied" == store.last().kind
        assert "flow" == store.last().body["decision"]["kind"]

    def test_labels_stay_in_their_session(self, gateway):
        """Another session of the same principal is not tainted."""
        call(gateway, "read_file", {"path": "a"}, session="s1")

        assert "ok" == call(gateway, "http_post", {"url": "https://x"}, session="s2").kind


class TestResultRules:
    def test_credentials_are_redacted_before_the_model_and_the_audit(self, gateway, store):
        """A key in a result is replaced before it is returned; the record keeps the body."""
        result = call(gateway, "read_file", {"path": "notes/.env"})
        body = store.last().body

        assert "AWS key [REDACTED] in .env" == result.content
        assert ("AWS key [REDACTED] in .env", 1, ["secret"]) == (
            body["result"], body["redactions"], body["result_labels"])
        assert "AKIA" not in store.last().body_json.decode()

    def test_the_audit_keeps_only_a_hash_by_default(self, gateway, store):
        """Without audit_body: body, call.completed holds the hash and no body."""
        result = call(gateway, "http_post", {"url": "https://x"})
        body = store.last().body

        assert "[REDACTED]" == result.content["token"]
        assert body["result"] is None
        assert 64 == len(body["result_sha256"])


class TestBadInput:
    @pytest.mark.parametrize(
        "path", ["../etc/passwd", "/etc/passwd", "a/../../x", "a\\..\\..\\x", "a\x00b", ""],
    )
    def test_path_traversal_is_a_constraint_denial(self, gateway, store, path):
        """A confined path argument that leaves its root is denied as constraint, audited."""
        result = call(gateway, "read_file", {"path": path})

        assert ("constraint", "$.path", "confine.read_file") == (
            result.kind, result.content.get("json_path"), result.content["rule"])
        assert "call.denied" == store.last().kind

    def test_paths_inside_the_root_run(self, gateway):
        """A path that stays inside the root after .. is resolved is allowed."""
        assert "ok" == call(gateway, "read_file", {"path": "a/../b/./c.txt"}).kind

    def test_deep_arguments_are_denied_before_parsing_again(self, gateway, store):
        """Arguments nested past the bound are denied by the bounds check."""
        deep: object = "x"
        for _ in range(70):
            deep = [deep]
        result = call(gateway, "http_post", {"url": "u", "body": deep})

        assert ("schema", "input.bounds") == (result.kind, result.content["rule"])

    @pytest.mark.parametrize(
        "text",
        [
            '{"name": "http_post", "arguments": {"url": NaN}}',
            '{"name": "http_post", "arguments": {"url": "a", "url": "b"}}',
        ],
    )
    def test_nan_and_duplicate_keys_never_reach_the_policy(self, gateway, store, text):
        """NaN and duplicate keys end as malformed and are audited as call.rejected."""
        (result,) = gateway.handle_text(f"<tool_call>{text}</tool_call>", principal="ana")

        assert "malformed" == result.kind
        assert "call.rejected" == store.last().kind

    def test_type_confusion_is_a_schema_denial(self, gateway):
        """A string where an integer belongs is denied as schema at its path."""
        result = call(gateway, "refund", {"order_id": "A", "amount_cents": "1"})

        assert ("schema", "$.amount_cents") == (result.kind, result.content["json_path"])


class TestReload:
    def test_a_changed_file_is_reloaded_and_audited(self, gateway, policy_file, store):
        """A valid change takes effect and is audited as policy.reloaded with both digests."""
        before = gateway.policy.digest
        policy_file.write_text(POLICY.replace("limit: 2, window_seconds: 60",
                                              "limit: 9, window_seconds: 60"))
        gateway.policy._next_poll = 0.0

        call(gateway, "http_post", {"url": "u"})
        reloaded = next(r for r in store.records() if r.kind == "policy.reloaded")

        assert (True, before) == (reloaded.body["ok"], reloaded.body["previous_digest"])
        assert gateway.policy.digest == reloaded.body["digest"] != before

    def test_a_failed_reload_keeps_the_last_good_policy(self, gateway, policy_file, store):
        """An invalid file is audited as policy.reload_failed; the old policy keeps deciding."""
        before = gateway.policy.digest
        policy_file.write_text("version: 1\ndefault: allow\nrules: []\n")
        gateway.policy._next_poll = 0.0

        result = call(gateway, "http_post", {"url": "u"})
        failed = next(r for r in store.records() if r.kind == "policy.reload_failed")

        assert "ok" == result.kind
        assert (False, before, before) == (failed.body["ok"], failed.body["digest"],
                                           gateway.policy.digest)
        assert "$.default" in failed.body["message"]


def test_policy_satisfies_the_gateway_hooks(make_policy):
    """Policy offers the optional hooks the gateway looks for."""
    hooks: PolicyHooks = make_policy()

    assert isinstance(hooks, PolicyHooks)


class TestShadowMode:
    SHADOW = POLICY.replace("rules:\n", "rules:\n  - {id: shadow-no-posts, effect: deny, "
                            "roles: [agent], tools: [http_post]}\n")

    def test_differences_are_signed_audit_records_never_enforced(self, tmp_path, registry,
                                                                  clock, store):
        """A stricter shadow never denies; each divergence is a signed policy.shadow_diverged."""
        state = PolicyState(tmp_path / "policy-state.db")
        shadow = Policy.from_text(self.SHADOW, state=state, clock=clock)
        policy = Policy.from_text(POLICY, state=state, clock=clock, shadow=shadow)
        gateway = Gateway(registry=registry, policy=policy, runner=StubRunner({}), audit=store)

        results = [call(gateway, "http_post", {"url": "u"}) for _ in range(2)]
        agreed = call(gateway, "read_file", {"path": "/workspace/a"})
        records = list(store.records())
        diverged = [r for r in records if r.kind == "policy.shadow_diverged"]

        assert ["ok", "ok", "ok"] == [r.kind for r in (*results, agreed)]
        assert 2 == len(diverged)
        body = diverged[0].body
        assert ({"effect": "allow", "kind": None,
                 "reasons": ["schema.http_post", "agents-use-everything"]},
                {"effect": "deny", "kind": "permission", "reasons": ["shadow-no-posts"]},
                shadow.digest, policy.digest, "c-http_post", "ana") == (
            body["enforced"], body["candidate"], body["candidate_digest"],
            body["enforced_digest"], body["call_id"], body["principal"])
        # Each divergence is written before its call's own record, and signed like it.
        kinds = [r.kind for r in records]
        assert kinds.index("policy.shadow_diverged") < kinds.index("call.authorized")
        assert all(r.signature for r in diverged)

    def test_the_shadow_sees_the_state_before_the_call_counts(self, tmp_path, registry, clock):
        """An identical shadow agrees on the last call a rate limit allows (no false divergence)."""
        state = PolicyState(tmp_path / "policy-state.db")
        shadow = Policy.from_text(POLICY, state=state, clock=clock)
        policy = Policy.from_text(POLICY, state=state, clock=clock, shadow=shadow)
        spec = registry.get("http_post")

        outcomes = [policy.decide_with_shadow(
            ToolCall.create(id=f"p{n}", name="http_post", arguments={"url": "u"},
                            dialect="api"), spec, CallContext("ana")) for n in range(3)]

        assert [("allow", None), ("allow", None), ("deny", None)] == [
            (decision.effect, diverged) for decision, diverged in outcomes]

    def test_a_broken_shadow_changes_nothing(self, registry, clock):
        """A shadow that fails inside never affects the enforced decision."""

        class StubBrokenShadow:
            digest = "0" * 64

            def _evaluate(self, *args, **kwargs):
                raise RuntimeError("injected")

        policy = Policy.from_text(POLICY, clock=clock, shadow=StubBrokenShadow())
        call_ = ToolCall.create(id="p", name="http_post", arguments={"url": "u"}, dialect="api")

        decision, diverged = policy.decide_with_shadow(call_, registry.get("http_post"),
                                                       CallContext("ana"))

        assert ("allow", None) == (decision.effect, diverged)

    def test_an_audit_failure_on_the_divergence_loses_no_call(self, tmp_path, registry, clock,
                                                             store):
        """If the divergence cannot be written, the call still runs and is audited."""

        class FlakyShadowLog:
            def append(self, kind, body):
                if kind == "policy.shadow_diverged":
                    raise RuntimeError("injected")
                return store.append(kind, body)

        state = PolicyState(tmp_path / "policy-state.db")
        shadow = Policy.from_text(self.SHADOW, state=state, clock=clock)
        policy = Policy.from_text(POLICY, state=state, clock=clock, shadow=shadow)
        gateway = Gateway(registry=registry, policy=policy, runner=StubRunner({}),
                          audit=FlakyShadowLog())

        result = call(gateway, "http_post", {"url": "u"})

        assert "ok" == result.kind
        assert ["call.authorized", "call.completed"] == [r.kind for r in store.records()]

