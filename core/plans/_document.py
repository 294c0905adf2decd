"""
Plans: tool calls whose arguments can be earlier calls' outputs, checked before anything runs.

A plan is a YAML or JSON file (or the same value built in Python)::

    version: 1
    name: news-summary              # optional, for people and the audit log
    max_parallel: 4                 # optional, 1..64; independent steps run at once
    steps:
      - id: search                  # unique; [A-Za-z_][A-Za-z0-9_-]{0,63}
        tool: keyword_search        # a tool the gateway's registry knows
        arguments: {query: solar storage, limit: 3}
      - id: clean
        tool: clean_text
        arguments:
          texts: {$ref: "steps.search.output.hits"}
        after: [search]             # optional: run after these without taking their data

An argument, anywhere inside ``arguments``, may be an object with the single
key ``$ref`` naming an earlier step's output. The grammar, all of it::

    ref   = "steps." step "." "output" *( "." key / "[" index "]" / "[" string "]" )
    step  = [A-Za-z_] *[A-Za-z0-9_-]          (at most 64 characters)
    key   = [A-Za-z_] *[A-Za-z0-9_-]
    index = "0" / [1-9] *8DIGIT                (into a list)
    string = a JSON string                     (a key with other characters)

Anything else, an object holding ``$ref`` beside other keys, a reference to an
unknown step or to the step itself, a cycle, a duplicate id or a tool the
registry does not know is refused before anything runs, with ``PlanInvalid``
naming every problem and where it is (``steps[1].arguments.texts``). A
reference that does not resolve at run time (no such key, an index past the
end) fails only its step, with where the walk stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import yaml

from callward.core._canonical import (
    MAX_JSON_BYTES,
    JSONValue,
    Sha256Hex,
    canonical_bytes,
    canonical_loads,
    canonical_sha256,
    strict_loads,
)
from callward.core._yaml import strict_yaml_load
from callward.core.errors import ConfigurationError

MAX_PLAN_BYTES: Final = MAX_JSON_BYTES
MAX_STEPS: Final = 256
MAX_PARALLEL: Final = 64
DEFAULT_MAX_PARALLEL: Final = 4
PLAN_DIGEST_DOMAIN: Final = b"callward.plan.v1\x00"
REF_KEY: Final = "$ref"

_STEP_ID: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_TOOL_NAME: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_.-]{0,127}\Z")
_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_INDEX: Final = re.compile(r"0|[1-9][0-9]{0,8}")
_TOP_KEYS: Final = frozenset({"version", "name", "description", "max_parallel", "steps"})
_STEP_KEYS: Final = frozenset({"id", "tool", "arguments", "after", "description"})


@dataclass(frozen=True, slots=True)
class PlanProblem:
    """One reason a plan is refused, and where in the plan it is."""

    location: str
    message: str

    def to_json(self) -> dict[str, JSONValue]:
        return {"location": self.location, "message": self.message}


class PlanInvalid(ConfigurationError):
    """
    A plan is malformed or refers to what does not exist; nothing of it ran.

    Attributes:
        problems: Every problem found, each with its location in the plan.
    """

    def __init__(self, source: str, problems: Sequence[PlanProblem]) -> None:
        listed = "; ".join(f"{p.location}: {p.message}" for p in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        super().__init__(f"plan {source} is invalid: {listed}{more}", kind="plan_invalid",
                         remediation="fix the plan at the locations named; nothing ran")
        self.source = source
        self.problems = tuple(problems)


class RefUnresolved(ValueError):
    """A reference's path does not exist in the output it reads; says where the walk stopped."""


@dataclass(frozen=True, slots=True)
class OutputRef:
    """A parsed ``$ref``: the step it reads and the path into that step's output."""

    step: str
    path: tuple[str | int, ...]

    @property
    def output_path(self) -> str:
        """The path as written after the step id, e.g. ``output.hits[0].text``."""
        text = "output"
        for part in self.path:
            if isinstance(part, int):
                text += f"[{part}]"
            elif _KEY.fullmatch(part):
                text += f".{part}"
            else:
                text += f"[{json.dumps(part, ensure_ascii=False)}]"
        return text

    @property
    def text(self) -> str:
        return f"steps.{self.step}.{self.output_path}"

    def resolve(self, output: JSONValue) -> JSONValue:
        """
        The value at this path in ``output``.

        Raises:
            RefUnresolved: A key is missing, an index is past the end, or a step of
                the path meets a value of the wrong type; the message says where.
        """
        value = output
        walked = OutputRef(self.step, ())
        for part in self.path:
            here = walked.output_path
            if isinstance(part, int):
                if not isinstance(value, list):
                    raise RefUnresolved(f"{here} is {_type_name(value)}, not a list")
                if part >= len(value):
                    raise RefUnresolved(f"{here} has {len(value)} items, no index {part}")
                value = value[part]
            else:
                if not isinstance(value, dict):
                    raise RefUnresolved(f"{here} is {_type_name(value)}, not an object")
                if part not in value:
                    raise RefUnresolved(f"{here} has no key {json.dumps(part)}")
                value = value[part]
            walked = OutputRef(self.step, (*walked.path, part))
        return value


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), "a value")


def parse_ref(text: str) -> OutputRef:
    """
    Parse a reference in the grammar of the module docstring.

    Raises:
        ValueError: The text is not in the grammar; the message gives the offset.
    """
    if not text.startswith("steps."):
        raise ValueError("a $ref starts with 'steps.'")
    at = len("steps.")
    step = _STEP_ID.match(text, at)
    if step is None:
        raise ValueError(f"a step id is expected at offset {at}")
    at = step.end()
    tail = at + len(".output")
    if not text.startswith(".output", at) or (tail < len(text) and text[tail] not in ".["):
        raise ValueError(f"'.output' is expected after the step id, at offset {at}")
    at += len(".output")
    path: list[str | int] = []
    while at < len(text):
        if text[at] == ".":
            key = _KEY.match(text, at + 1)
            if key is None:
                raise ValueError(f"a key is expected at offset {at + 1}")
            path.append(key.group())
            at = key.end()
        elif text.startswith('["', at):
            end, key_text = _json_string(text, at + 1)
            if not text.startswith("]", end):
                raise ValueError(f"']' is expected at offset {end}")
            path.append(key_text)
            at = end + 1
        elif text[at] == "[":
            index = _INDEX.match(text, at + 1)
            if index is None or not text.startswith("]", index.end()):
                raise ValueError(f"an index (a whole number) and ']' are expected at offset "
                                 f"{at + 1}")
            path.append(int(index.group()))
            at = index.end() + 1
        else:
            raise ValueError(f"'.' or '[' is expected at offset {at}")
    return OutputRef(step.group(), tuple(path))


def _json_string(text: str, at: int) -> tuple[int, str]:
    try:
        value, end = json.JSONDecoder().raw_decode(text, at)
    except json.JSONDecodeError as exc:
        raise ValueError(f"a JSON string is expected at offset {at}") from exc
    if not isinstance(value, str):
        raise ValueError(f"a JSON string is expected at offset {at}")  # noqa: TRY004 - plan text
    return end, value


@dataclass(frozen=True, slots=True)
class PlanStep:
    """
    One step: a tool, its arguments (``$ref`` objects kept in place) and what it waits for.

    Attributes:
        refs: Each reference, with the RFC 6901 pointer of the argument it fills.
        after: Steps it runs after without taking their output.
    """

    id: str
    tool: str
    arguments_json: bytes
    refs: tuple[tuple[str, OutputRef], ...] = ()
    after: tuple[str, ...] = ()

    @property
    def arguments(self) -> dict[str, JSONValue]:
        value: dict[str, JSONValue] = canonical_loads(self.arguments_json)
        return value

    @property
    def depends_on(self) -> tuple[str, ...]:
        """Every step this one waits for, in the order first named."""
        return tuple(dict.fromkeys([*(ref.step for _, ref in self.refs), *self.after]))

    def to_json(self) -> dict[str, JSONValue]:
        return {"id": self.id, "tool": self.tool, "depends_on": list(self.depends_on),
                "refs": [{"argument": pointer, "ref": ref.text} for pointer, ref in self.refs]}


@dataclass(frozen=True, slots=True)
class Plan:
    """
    A validated plan: unique step ids, references to known earlier steps, no cycle.

    Attributes:
        digest: SHA-256 of the canonical plan value, named in every plan record.
        order: The step ids in an order where each comes after what it depends on.
    """

    steps: tuple[PlanStep, ...]
    digest: Sha256Hex
    order: tuple[str, ...]
    name: str = ""
    max_parallel: int | None = None
    source: str = "<plan>"
    _by_id: Mapping[str, PlanStep] = field(default_factory=dict, compare=False, repr=False)

    def step(self, step_id: str) -> PlanStep:
        return self._by_id[step_id]

    def dependents(self, step_id: str) -> tuple[str, ...]:
        """The steps that wait for ``step_id``, in plan order."""
        return tuple(s.id for s in self.steps if step_id in s.depends_on)

    def check_tools(self, tools: Collection[str]) -> None:
        """
        Refuse a plan that names a tool outside ``tools`` (the registry's names).

        Raises:
            PlanInvalid: Every step whose tool is unknown, by location.
        """
        problems = [PlanProblem(f"steps[{i}].tool", f"no tool {step.tool!r} is registered")
                    for i, step in enumerate(self.steps) if step.tool not in tools]
        if problems:
            raise PlanInvalid(self.source, problems)

    def to_json(self) -> dict[str, JSONValue]:
        return {"name": self.name, "digest": self.digest, "max_parallel": self.max_parallel,
                "steps": [step.to_json() for step in self.steps]}


def load_plan(path: Path, *, tools: Collection[str] | None = None) -> Plan:
    """
    Read and validate a plan file (``.json`` as strict JSON, anything else as YAML).

    Raises:
        PlanInvalid: The file cannot be read or the plan is invalid.
    """
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PlanInvalid(source, [PlanProblem("$", f"the file cannot be read "
                                                    f"({type(exc).__name__})")]) from exc
    return parse_plan(data, source=source, json_only=path.suffix == ".json", tools=tools)


def parse_plan(data: bytes | str, *, source: str = "<plan>", json_only: bool = False,
               tools: Collection[str] | None = None) -> Plan:
    """
    Parse and validate a plan's text.

    Raises:
        PlanInvalid: The text is too large, not YAML/JSON, has a duplicate key, or
            the plan is invalid.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanInvalid(source, [PlanProblem("$", f"the plan is over {MAX_PLAN_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
        value = strict_loads(text) if json_only else strict_yaml_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None) or getattr(exc, "pos", None)
        raise PlanInvalid(source, [PlanProblem("$", f"not valid {'JSON' if json_only else 'YAML'}"
                                                    f" ({type(exc).__name__} at {where})")]
                          ) from exc
    return build_plan(value, source=source, tools=tools)


def build_plan(value: object, *, source: str = "<plan>",
               tools: Collection[str] | None = None) -> Plan:
    """
    Validate a decoded plan value and build the ``Plan``.

    Args:
        tools: The names the registry knows; None skips that check (``run_plan``
            checks it against the gateway's registry before running).

    Raises:
        PlanInvalid: Every problem found, each with its location.
    """
    problems: list[PlanProblem] = []
    if not isinstance(value, dict):
        raise PlanInvalid(source, [PlanProblem("$", "a plan is an object with 'steps'")])
    name, max_parallel = _header(value, problems)
    raw_steps = value.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append(PlanProblem("steps", "a plan has a non-empty list of steps"))
        raise PlanInvalid(source, problems)
    if len(raw_steps) > MAX_STEPS:
        problems.append(PlanProblem("steps", f"a plan has at most {MAX_STEPS} steps"))
        raise PlanInvalid(source, problems)

    steps: list[PlanStep] = []
    index_of: dict[str, int] = {}
    for i, raw in enumerate(raw_steps):
        step = _build_step(raw, f"steps[{i}]", problems)
        if step is None:
            continue
        if step.id in index_of:
            problems.append(PlanProblem(f"steps[{i}].id", f"duplicate step id {step.id!r} "
                                                          f"(first at steps[{index_of[step.id]}])"))
            continue
        index_of[step.id] = i
        steps.append(step)
    _check_links(steps, index_of, problems)
    if tools is not None:
        problems.extend(PlanProblem(f"steps[{index_of[s.id]}].tool",
                                    f"no tool {s.tool!r} is registered")
                        for s in steps if s.tool not in tools)
    if problems:
        raise PlanInvalid(source, problems)
    by_id = {step.id: step for step in steps}
    order, cycle = _topological(steps)
    if cycle:
        raise PlanInvalid(source, [PlanProblem(f"steps[{index_of[cycle[0]]}]",
                                               "the steps form a cycle: " + " -> ".join(cycle))])
    digest = canonical_sha256({"name": name, "max_parallel": max_parallel,
                               "steps": [{"id": s.id, "tool": s.tool, "after": list(s.after),
                                          "arguments": s.arguments} for s in steps]},
                              domain=PLAN_DIGEST_DOMAIN)
    return Plan(tuple(steps), digest, tuple(order), name, max_parallel, source, by_id)


def _header(value: dict[object, object], problems: list[PlanProblem]
            ) -> tuple[str, int | None]:
    """The plan's own fields: its name and ``max_parallel`` (problems appended)."""
    for key in sorted(set(map(str, value)) - _TOP_KEYS):
        problems.append(PlanProblem(key, "unknown field"))
    if value.get("version", 1) != 1:
        problems.append(PlanProblem("version", "the only plan version is 1"))
    name = value.get("name", "")
    if not isinstance(name, str) or len(name) > 256:
        problems.append(PlanProblem("name", "a name is a string of at most 256 characters"))
        name = ""
    max_parallel = value.get("max_parallel")
    if max_parallel is not None and (type(max_parallel) is not int
                                     or not 1 <= max_parallel <= MAX_PARALLEL):
        problems.append(PlanProblem("max_parallel", f"a whole number from 1 to {MAX_PARALLEL}"))
        max_parallel = None
    return name, max_parallel if isinstance(max_parallel, int) else None


def _check_links(steps: Sequence[PlanStep], index_of: Mapping[str, int],
                 problems: list[PlanProblem]) -> None:
    """Every ``$ref`` and ``after`` names another step of the plan."""
    for step in steps:
        i = index_of[step.id]
        for pointer, ref in step.refs:
            where = f"steps[{i}].arguments{_pointer_location(pointer)}"
            if ref.step == step.id:
                problems.append(PlanProblem(where, "a step cannot refer to its own output"))
            elif ref.step not in index_of:
                problems.append(PlanProblem(where, f"$ref names unknown step {ref.step!r}"))
        for k, after in enumerate(step.after):
            if after == step.id:
                problems.append(PlanProblem(f"steps[{i}].after[{k}]", "names the step itself"))
            elif after not in index_of:
                problems.append(PlanProblem(f"steps[{i}].after[{k}]",
                                            f"names unknown step {after!r}"))


def _build_step(raw: object, where: str, problems: list[PlanProblem]) -> PlanStep | None:
    if not isinstance(raw, dict):
        problems.append(PlanProblem(where, "a step is an object with id, tool and arguments"))
        return None
    ok = True
    for key in sorted(set(map(str, raw)) - _STEP_KEYS):
        problems.append(PlanProblem(f"{where}.{key}", "unknown field"))
        ok = False
    step_id = raw.get("id")
    if not isinstance(step_id, str) or not _STEP_ID.fullmatch(step_id):
        problems.append(PlanProblem(f"{where}.id", "a step id matches [A-Za-z_][A-Za-z0-9_-]* "
                                                   "(at most 64 characters)"))
        ok = False
    tool = raw.get("tool")
    if not isinstance(tool, str) or not _TOOL_NAME.match(tool):
        problems.append(PlanProblem(f"{where}.tool", "a tool name is required"))
        ok = False
    arguments = raw.get("arguments", {})
    if not isinstance(arguments, dict) or REF_KEY in arguments:
        problems.append(PlanProblem(f"{where}.arguments", "arguments are an object (not a $ref)"))
        return None
    after = raw.get("after", [])
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        problems.append(PlanProblem(f"{where}.after", "after is a list of step ids"))
        ok = False
    try:
        arguments_json = canonical_bytes(arguments)
        strict_loads(arguments_json)
    except ValueError:
        problems.append(PlanProblem(f"{where}.arguments", "arguments are not JSON within bounds "
                                                          "(no NaN, at most 64 levels deep)"))
        return None
    refs: list[tuple[str, OutputRef]] = []
    for pointer, ref_text in _find_refs(arguments, ""):
        location = f"{where}.arguments{_pointer_location(pointer)}"
        if ref_text is None:
            problems.append(PlanProblem(location, "an object with $ref has no other key"))
            ok = False
            continue
        if not isinstance(ref_text, str):
            problems.append(PlanProblem(location, "a $ref is a string"))
            ok = False
            continue
        try:
            refs.append((pointer, parse_ref(ref_text)))
        except ValueError as exc:
            problems.append(PlanProblem(location, f"bad $ref: {exc}"))
            ok = False
    if not ok:
        return None
    return PlanStep(str(step_id), str(tool), arguments_json, tuple(refs),
                    tuple(dict.fromkeys(after)))


def _find_refs(value: object, pointer: str) -> Iterator[tuple[str, object]]:
    """Each ``$ref`` object in ``value``: its pointer and text (None if it has other keys)."""
    if isinstance(value, dict):
        if REF_KEY in value:
            yield pointer, (value[REF_KEY] if len(value) == 1 else None)
            return
        for key, item in value.items():
            yield from _find_refs(item, f"{pointer}/{_escape(key)}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _find_refs(item, f"{pointer}/{index}")


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _pointer_location(pointer: str) -> str:
    """``/a/0`` as ``.a[0]``, the way locations in a plan are written."""
    text = ""
    for token in pointer.split("/")[1:] if pointer else ():
        key = token.replace("~1", "/").replace("~0", "~")
        text += f"[{key}]" if key.isdigit() else (
            f".{key}" if _KEY.fullmatch(key) else f"[{json.dumps(key)}]")
    return text


def _topological(steps: Sequence[PlanStep]) -> tuple[list[str], list[str]]:
    """An order of the steps, or (when there is one) a cycle as a path of ids."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    order: list[str] = []
    by_id = {step.id: step for step in steps}

    def visit(step_id: str, path: list[str]) -> list[str]:
        state[step_id] = 1
        path.append(step_id)
        for dep in by_id[step_id].depends_on:
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state:
                cycle = visit(dep, path)
                if cycle:
                    return cycle
        path.pop()
        state[step_id] = 2
        order.append(step_id)
        return []

    for step in steps:
        if step.id not in state:
            cycle = visit(step.id, [])
            if cycle:
                return order, cycle
    return order, []


def substitute(arguments: JSONValue, values: Mapping[str, JSONValue], pointer: str = ""
               ) -> JSONValue:
    """``arguments`` with the ``$ref`` object at each pointer of ``values`` replaced."""
    if pointer in values:
        return values[pointer]
    if isinstance(arguments, dict):
        return {key: substitute(item, values, f"{pointer}/{_escape(key)}")
                for key, item in arguments.items()}
    if isinstance(arguments, list):
        return [substitute(item, values, f"{pointer}/{index}")
                for index, item in enumerate(arguments)]
    return arguments
