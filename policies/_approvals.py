"""
Approvals bound to the exact call: signed, single-use, expiring.

An approval is the Ed25519 signature (by the gateway's audit key, handed in
through ``ApprovalSigner``) over the canonical bytes of
``{proposal, principal, tool, tool_digest, arguments_sha256, approved_by,
approved_at, expires_at}``. It is valid only for a call by the same principal
to the same tool version with arguments of the same canonical digest, only
before it expires, and only once; its signature is checked against the
signer's public key every time it is used.
"""

from __future__ import annotations

from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from callward.core import JSONValue, PolicyDenied, canonical_bytes
from callward.policies._state import Proposal

APPROVAL_DOMAIN: Final = b"callward.approval.v1\x00"


class ApprovalSigner(Protocol):
    """What signs approvals: the audit signer satisfies it (``callward.audit.FileSigner``)."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...

    def public_key_pem(self) -> bytes: ...


class ApprovalRefused(PolicyDenied):
    """An approval could not be recorded: unknown, closed or expired proposal, or wrong approver."""

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message, kind="approval_required", rule=rule,
                         remediation="check the proposal id and who may approve it")


def approval_payload(proposal: Proposal, *, by: str, at: float) -> bytes:
    """The bytes an approval signs (domain-separated canonical JSON)."""
    body: dict[str, JSONValue] = {
        "proposal": proposal.id,
        "principal": proposal.principal,
        "tool": proposal.tool,
        "tool_digest": proposal.tool_digest,
        "arguments_sha256": proposal.arguments_sha256,
        "approved_by": by,
        "approved_at": round(at, 3),
        "expires_at": round(proposal.expires, 3),
    }
    return APPROVAL_DOMAIN + canonical_bytes(body)


def signature_valid(signer: ApprovalSigner, proposal: Proposal) -> bool:
    """Whether a stored approval is signed by ``signer``'s key and matches its proposal."""
    if proposal.approval is None or proposal.signature is None or proposal.key_id != signer.key_id:
        return False
    key = load_pem_public_key(signer.public_key_pem())
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(bytes(proposal.signature), bytes(proposal.approval))
    except InvalidSignature:
        return False
    expected = approval_payload(proposal, by=proposal.decided_by or "", at=0.0)
    # Everything but approved_at must match the proposal row it is stored with.
    return _without_time(bytes(proposal.approval)) == _without_time(expected)


def _without_time(payload: bytes) -> bytes:
    import json  # noqa: PLC0415 - only on the approval path

    body = json.loads(payload[len(APPROVAL_DOMAIN):])
    body.pop("approved_at", None)
    return canonical_bytes(body)
