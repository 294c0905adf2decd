"""
callward: every tool call a language model emits passes policy, runs in a
hardened container and is signed into an audit log before its result returns.

The package is split in four subpackages; import from them:

- ``callward.core``: shared types, errors, registry, parsing, the gateway, the CLI.
- ``callward.policies``: the policy document and its evaluator.
- ``callward.sandbox``: the sandbox protocol and its Docker backend.
- ``callward.audit``: signed, hash-chained records in SQLite, and offline verify.
"""

__version__ = "0.1.0"
