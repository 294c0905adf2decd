"""Every record of a call made with a token identity carries it; never without one."""

from __future__ import annotations

from callward.core import Identity, ToolCall

ISSUER = "https://login.example.com/"
IDENTITY = Identity(ISSUER, frozenset({"dba"}), frozenset({"emea"}), "b" * 64)


class TestIdentityFields:
    def test_authorized_completed_and_denied_carry_the_identity(self, gateway, store):
        """erin (no policy-file entry) with token role dba: drop_table runs, square is denied."""
        for number, (name, arguments) in enumerate((("drop_table", {"table": "users"}),
                                                    ("square", {"x": 3}))):
            call = ToolCall.create(id=f"c{number}", name=name, arguments=arguments,
                                   dialect="api")
            gateway.handle(call, principal="erin", identity=IDENTITY)

        calls = [r for r in store.records() if r.kind.startswith("call.")]

        assert ["call.authorized", "call.completed", "call.denied"] == [r.kind for r in calls]
        assert [IDENTITY.to_json()] * 3 == [r.body["identity"] for r in calls]

    def test_a_rejected_message_carries_the_identity(self, gateway, store):
        """A model message that cannot be parsed is rejected with the caller's identity."""
        gateway.handle_text('{"name": "square", "arguments": ', principal="erin",
                            identity=IDENTITY)

        (rejected,) = [r for r in store.records() if r.kind == "call.rejected"]
        assert ("erin", IDENTITY.to_json()) == (rejected.body["principal"],
                                                rejected.body["identity"])

    def test_no_identity_no_field(self, gateway, store):
        """A caller known only by name (static token, stdio, API) has no identity field."""
        call = ToolCall.create(id="c1", name="square", arguments={"x": 2}, dialect="api")
        gateway.handle(call, principal="alice")

        assert not any("identity" in r.body for r in store.records())
