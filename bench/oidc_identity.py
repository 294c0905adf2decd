"""
What an OIDC identity costs per request and per decision, against baselines measured
in the same process (run: .venv/bin/python -m bench.oidc_identity).

Timed:

- ``OidcVerifier.verify`` of an RS256 (2048-bit), ES256 and EdDSA access token, with
  the JWKS cached (a loopback file, read once); baseline: the static token lookup
  (``ClientTokens.principal_for``, SHA-256 and constant-time compare over 10 hashes).
- ``Policy.decide`` of the example policy's ``drop_table``: baseline a principal of the
  policy file without identity (the path every caller took before); with an identity
  whose roles come from the token, for a principal absent from the file and for one
  listed in it (entity set cached per identity); and a new identity every decision
  (the entity set built each time, the cache's worst case).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bench._common import EXAMPLES, cpu_summary, print_table, summarize, timed
from callward.core import CallContext, Identity, ToolCall, ToolRegistry
from callward.core.mcp._auth import parse_clients, token_sha256
from callward.core.mcp._oidc import OidcSettings, OidcVerifier
from callward.policies import Policy

ISSUER = "https://login.example.com/"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=3000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    keys = {"RS256": rsa.generate_private_key(65537, 2048),
            "ES256": ec.generate_private_key(ec.SECP256R1()),
            "EdDSA": ed25519.Ed25519PrivateKey.generate()}
    exporters = {"RS256": jwt.algorithms.RSAAlgorithm, "ES256": jwt.algorithms.ECAlgorithm,
                 "EdDSA": jwt.algorithms.OKPAlgorithm}
    jwks = {"keys": [{**exporters[alg].to_jwk(key.public_key(), as_dict=True), "kid": alg}
                     for alg, key in keys.items()]}
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "callward", "sub": "erin", "exp": now + 3600, "iat": now,
              "jti": "bench", "roles": ["dba"], "groups": ["emea"]}
    rows: list[tuple[object, ...]] = []
    with tempfile.TemporaryDirectory() as temporary:
        path = Path(temporary) / "jwks.json"
        path.write_text(json.dumps(jwks))
        verifier = OidcVerifier(OidcSettings(ISSUER, "callward", str(path),
                                             roles_claim="roles", groups_claim="groups"))
        tokens = {alg: jwt.encode(claims, key, algorithm=alg, headers={"kid": alg})
                  for alg, key in keys.items()}
        static = parse_clients([{"principal": f"p{n}", "token_sha256": token_sha256(f"t{n}")}
                                for n in range(10)])
        assert static is not None
        timed(lambda: static.principal_for("t9"), 300)
        base = timed(lambda: static.principal_for("t9"), args.count)
        base_p50 = summarize(base)[0]
        rows.append(("baseline: static token lookup", *summarize(base)[:2], 1.0))
        for alg, token in tokens.items():
            timed(lambda token=token: verifier.verify(token), 100)
            samples = timed(lambda token=token: verifier.verify(token), args.count)
            p50, p99, _ = summarize(samples)
            rows.append((f"OidcVerifier.verify {alg}", p50, p99, round(p50 / base_p50, 1)))
    print_table("Per HTTP request: who the client is", ("what", "p50 ms", "p99 ms",
                                                         "p50 / baseline p50"), rows)

    registry = ToolRegistry()
    registry.load(EXAMPLES / "tools.py")
    policy = Policy.from_file(EXAMPLES / "policy.yaml")
    spec = registry.require("drop_table")
    call = ToolCall.create(id="c1", name="drop_table", arguments={"table": "users"},
                           dialect="api")
    dba = Identity(ISSUER, frozenset({"dba"}), frozenset({"emea"}), "0" * 64)
    contexts = {
        "baseline: dana (policy file), no identity": CallContext("dana"),
        "erin (not in the file), token role dba": CallContext("erin", identity=dba),
        "alice (in the file), token role dba": CallContext("alice", identity=dba),
    }
    for context in contexts.values():
        assert policy.decide(call, spec, context).effect == "allow"
    decision_rows: list[tuple[object, ...]] = []
    baseline = 0.0
    for name, context in contexts.items():
        timed(lambda context=context: policy.decide(call, spec, context), 300)
        samples = timed(lambda context=context: policy.decide(call, spec, context), args.count)
        p50, p99, _ = summarize(samples)
        baseline = baseline or p50
        decision_rows.append((name, p50, p99, round(p50 / baseline, 2)))
    fresh = iter(range(10**9))
    samples = timed(lambda: policy.decide(call, spec, CallContext("erin", identity=Identity(
        ISSUER, frozenset({"dba", f"r{next(fresh)}"})))), args.count)
    p50, p99, _ = summarize(samples)
    decision_rows.append(("a new identity every decision (uncached)", p50, p99,
                          round(p50 / baseline, 2)))
    print_table(f"Policy.decide with and without a token identity ({args.count} each)",
                ("what", "p50 ms", "p99 ms", "p50 / baseline p50"), decision_rows)
    print(f"\n{cpu_summary()}")


if __name__ == "__main__":
    main()
