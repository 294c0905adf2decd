"""
The policy document format, version 1: the YAML a policy may hold, as a JSON Schema.

``callward.policies._loader`` validates every document against
``DOCUMENT_SCHEMA`` before it reads a field: an unknown field or a value out
of range is refused there, so the model never holds one.

Format, version 1 (every section but ``version`` and ``default`` is optional,
and a document needs ``rules`` or ``cedar``)::

    version: 1
    default: deny                 # the only accepted value
    principals:
      alice: {roles: [analyst], groups: [emea]}
    rules:                        # simple rules, compiled to Cedar policies
      - id: analysts-do-math      # unique, named in every decision it makes
        effect: allow             # or deny; a matching deny overrides any allow
        roles: [analyst]          # who: roles, groups and/or principals ("*" = anyone)
        tools: [square, add]      # what: tool names ("*" = any registered tool)
    cedar: [team.cedar]           # Cedar policy files, relative to this document
    cedar_inline: |               # or Cedar text inline
      @id("no-big-refunds")
      forbid (principal, action, resource == Tool::"refund")
        when { context.arguments.amount_cents > 50000 };
    tools:
      read_file:
        limits: {wall_seconds: 1}
        labels: [filesystem]      # added to the tool's own labels
        output_labels: [secret]   # every result of this tool carries these
        declassifies: [untrusted] # labels its arguments carry that its result does not
        confine: {root: /workspace, arguments: [path]}
      http_get:
        constraints:              # parsed before compared; a broken one denies as constraint
          - {id: api-only, argument: url,     # or a path: request.url, links[*].url
             url: {schemes: [https], hosts: [api.example.com, "*.example.org"],
                   ports: [443], path_prefixes: [/v1/]}}   # IP literals only if listed
      send_mail:
        constraints:
          - {id: mail-inside, argument: to, email: {domains: [example.com]}}
      refund:
        constraints:              # per principal, role or group; all that apply must hold
          - {id: clerk-refunds, argument: amount_cents, roles: [clerk],
             number: {minimum: 0, maximum: 50000, integer: true}}
          - {id: region, argument: region, string: {one_of: [eu-west, us-east]}}
      fetch_issues:
        secrets: [GITHUB_TOKEN]   # grants secrets the tool declares (@tool(secrets=...))
        egress: ["127.0.0.1:8080", "internal.example:443"]  # host:port via the egress proxy
      square:
        versions: ["1.0.0"]       # pins: a call resolving to another version is denied
        digests: ["<sha256>"]     # and/or to another digest (rule tools.square.pin)
    rate_limits:
      - {id: refunds-per-hour, tools: [refund], limit: 5, window_seconds: 3600,
         algorithm: sliding_window, per: [principal, tool]}
    approvals:
      - {id: refunds-need-a-manager, tools: [refund], approvers: {roles: [manager]},
         expires_seconds: 900}
    flows:                        # per value for calls whose provenance is known (plan
      - {id: no-secret-egress, from: [secret], to: [egress]}   # steps), else per session
    results:
      - {id: redact-credentials, tools: ["*"], redact: [credentials], audit_body: hash}
    mcp_content:                  # upstream MCP resources and prompts: off unless listed
      - {id: notes-public, server: notes, resources: ["note://public/*"],
         prompts: [summarize], roles: [analyst]}   # URI / name globs; who is optional
    anomalies:                    # while an anomaly is open for the caller (core/observe)
      - {id: hold-anomalous, effect: approval, tools: ["*"], metrics: [call_rate, denial_ratio],
         approvers: {roles: [security]}}   # or effect: deny; metrics default to all
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from callward.policies._anomaly_state import ANOMALY_METRICS
from callward.policies._constraint_section import CONSTRAINTS_SCHEMA

_ID: Final = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,127}$"}
_NAME_LIST: Final = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 256},
    "uniqueItems": True,
}
_LABEL_LIST: Final = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[a-z][a-z0-9_.-]{0,63}$"},
    "uniqueItems": True,
}
_LIMITS: Final = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "wall_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "memory_mebibytes": {"type": "integer", "minimum": 16, "maximum": 65536},
        "pids": {"type": "integer", "minimum": 4, "maximum": 4096},
        "cpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 64},
        "output_bytes": {"type": "integer", "minimum": 1, "maximum": 1 << 30},
        "tmp_mebibytes": {"type": "integer", "minimum": 1, "maximum": 65536},
        "open_files": {"type": "integer", "minimum": 16, "maximum": 65536},
    },
}
_WHO: Final = {"roles": _NAME_LIST, "groups": _NAME_LIST, "principals": _NAME_LIST}
_ANOMALY_GATES: Final = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "effect"],
        "if": {"properties": {"effect": {"const": "approval"}}},
        "then": {"required": ["approvers"]},
        "else": {"not": {"anyOf": [{"required": ["approvers"]},
                                   {"required": ["expires_seconds"]}]}},
        "properties": {
            "id": _ID,
            "description": {"type": "string"},
            "effect": {"enum": ["deny", "approval"]},
            "tools": {**_NAME_LIST, "minItems": 1},
            **_WHO,
            "metrics": {"type": "array", "minItems": 1, "uniqueItems": True,
                        "items": {"enum": list(ANOMALY_METRICS)}},
            "approvers": {"type": "object", "additionalProperties": False,
                          "minProperties": 1, "properties": _WHO},
            "expires_seconds": {"type": "number", "exclusiveMinimum": 0,
                                "maximum": 7 * 86400},
        },
    },
}
DOCUMENT_SCHEMA: Final[Mapping[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["version", "default"],
    "anyOf": [{"required": ["rules"]}, {"required": ["cedar"]}, {"required": ["cedar_inline"]}],
    "properties": {
        "version": {"const": 1},
        "default": {"const": "deny"},
        "description": {"type": "string"},
        "principals": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"roles": _NAME_LIST, "groups": _NAME_LIST},
            },
        },
        "rules": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "effect", "tools"],
                "anyOf": [{"required": ["roles"]}, {"required": ["principals"]},
                          {"required": ["groups"]}],
                "properties": {
                    "id": _ID,
                    "effect": {"enum": ["allow", "deny"]},
                    "description": {"type": "string"},
                    **_WHO,
                    "tools": {**_NAME_LIST, "minItems": 1},
                },
            },
        },
        "cedar": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 4096},
            "uniqueItems": True,
        },
        "cedar_inline": {"type": "string"},
        "tools": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "limits": _LIMITS,
                    # Sandbox settings, read by the gateway's sandbox stage.
                    "isolation": {"enum": ["call", "session"]},
                    "runtime": {"enum": ["runc", "runsc"]},
                    "secrets": {
                        "type": "array", "uniqueItems": True,
                        "items": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]{0,63}$"},
                    },
                    "egress": {
                        "type": "array", "uniqueItems": True, "maxItems": 64,
                        "items": {"type": "string", "minLength": 3, "maxLength": 261},
                    },
                    "labels": _LABEL_LIST,
                    "output_labels": _LABEL_LIST,
                    "declassifies": _LABEL_LIST,
                    # Pins: the versions and/or digests a call may resolve to.
                    "versions": {"type": "array", "minItems": 1, "uniqueItems": True,
                                 "items": {"type": "string",
                                           "pattern": "^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$"}},
                    "digests": {"type": "array", "minItems": 1, "uniqueItems": True,
                                "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
                    "constraints": CONSTRAINTS_SCHEMA,
                    "confine": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["root", "arguments"],
                        "properties": {
                            "root": {"type": "string", "pattern": "^/"},
                            "arguments": {**_NAME_LIST, "minItems": 1},
                        },
                    },
                },
            },
        },
        "rate_limits": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "limit", "window_seconds"],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "tools": _NAME_LIST,
                    "labels": _LABEL_LIST,
                    **_WHO,
                    "per": {
                        "type": "array",
                        "items": {"enum": ["principal", "tool", "session"]},
                        "uniqueItems": True,
                    },
                    "algorithm": {"enum": ["sliding_window", "token_bucket"]},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000},
                    "window_seconds": {"type": "number", "exclusiveMinimum": 0,
                                       "maximum": 366 * 86400},
                },
            },
        },
        "approvals": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "tools", "approvers"],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "tools": {**_NAME_LIST, "minItems": 1},
                    **_WHO,
                    "approvers": {
                        "type": "object",
                        "additionalProperties": False,
                        "minProperties": 1,
                        "properties": _WHO,
                    },
                    "expires_seconds": {"type": "number", "exclusiveMinimum": 0,
                                        "maximum": 7 * 86400},
                },
            },
        },
        "flows": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "from", "to"],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "from": {**_LABEL_LIST, "minItems": 1},
                    "to": {**_LABEL_LIST, "minItems": 1},
                },
            },
        },
        "mcp_content": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "server"],
                "anyOf": [{"required": ["resources"]}, {"required": ["prompts"]}],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "server": {"type": "string", "pattern": "^[a-z][a-z0-9]*(_[a-z0-9]+)*$"},
                    "resources": _NAME_LIST,
                    "prompts": _NAME_LIST,
                    **_WHO,
                },
            },
        },
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id"],
                "properties": {
                    "id": _ID,
                    "description": {"type": "string"},
                    "tools": _NAME_LIST,
                    "redact": {"type": "array", "items": {"type": "string", "minLength": 1,
                                                          "maxLength": 1024}},
                    "audit_body": {"enum": ["hash", "body"]},
                },
            },
        },
        # Gates on open anomalies (callward.core.observe._anomaly): deny, or require approval.
        "anomalies": _ANOMALY_GATES,
    },
}

#: Named redaction patterns a ``results`` rule can use besides its own regexes.
NAMED_PATTERNS: Final[Mapping[str, str]] = {
    "credentials": "|".join((
        r"AKIA[0-9A-Z]{16}",                                  # AWS access key id
        r"gh[pousr]_[A-Za-z0-9]{36,255}",                     # GitHub tokens
        r"sk-[A-Za-z0-9_-]{20,}",                             # API keys of the sk- form
        r"xox[abprs]-[A-Za-z0-9-]{10,}",                      # Slack tokens
        r"(?i:bearer)\s+[A-Za-z0-9._~+/=-]{16,}",             # bearer tokens
        r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    )),
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
}
