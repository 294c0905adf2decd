"""
Every example in README.md and docs/*.md works as shown.

A fenced ``yaml`` block is one of three things, told apart by its top-level keys, and must
validate as that thing: a policy (``version`` with ``rules``, ``default`` or ``cedar``), a
plan (``version`` and ``steps``), or a ``callward.yaml`` configuration (every key a section
of the configuration schema; a block showing only some sections is checked with the
required ``tools`` and ``policy`` filled in). A ``cedar`` block whose first line is
``// NAME.cedar`` is that file, for the policies of its page that name it. A ``python``
block must compile, and its ``callward`` imports must resolve without a
``DeprecationWarning`` (a name still reachable where it used to live is a stale example).

A block that is not meant to be complete says so on the line before its fence, as
``<!-- not checked: the reason -->``; only those are skipped, and their test ids say
``not-checked`` and how many there are. Blocks in other languages (``sh``, ``text``)
are not examples of anything this test can check.
"""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from callward.core import CallContext, ToolRegistry
from callward.core._yaml import strict_yaml_load
from callward.core.gateway._config import CONFIG_SCHEMA, load_config
from callward.core.mcp._auth import parse_clients
from callward.core.mcp._oidc import parse_oidc
from callward.core.mcp._section import parse_mcp_section
from callward.core.parse import parse_model_output
from callward.core.plans import parse_plan
from callward.policies import Policy

ROOT = Path(__file__).resolve().parents[2]
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
CHECKED_LANGUAGES = frozenset({"yaml", "python"})
CONFIG_SECTIONS = frozenset(CONFIG_SCHEMA["properties"])

_FENCE = re.compile(r"(?P<fence>`{3,})(?P<lang>[\w+-]*)\s*")
_NOT_CHECKED = re.compile(r"<!--\s*not checked:\s*(?P<reason>\S.*?)\s*-->")
_CEDAR_NAME = re.compile(r"//\s*(?P<name>[\w.-]+\.cedar)\s*")
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@dataclass(frozen=True, slots=True)
class Example:
    """One fenced block of a page, with the line its fence opens on."""

    page: Path
    line: int
    lang: str
    text: str
    closed: bool
    not_checked: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()


def _blocks(page: Path) -> list[Example]:
    lines = page.read_text(encoding="utf-8").split("\n")
    found = []
    index = 0
    while index < len(lines):
        opening = _FENCE.fullmatch(lines[index])
        if opening is None:
            index += 1
            continue
        closing = re.compile(rf"{opening['fence']}`*\s*")
        end = index + 1
        while end < len(lines) and not closing.fullmatch(lines[end]):
            end += 1
        previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        marker = _NOT_CHECKED.fullmatch(previous)
        found.append(Example(
            page=page,
            line=index + 1,
            lang=opening["lang"],
            text="\n".join(lines[index + 1:end]) + "\n",
            closed=end < len(lines),
            not_checked=marker["reason"] if marker else None,
        ))
        index = end + 1
    return found


BLOCKS = [block for page in PAGES for block in _blocks(page)]
EXAMPLES = [block for block in BLOCKS if block.lang in CHECKED_LANGUAGES]


def _kind(example: Example) -> str:
    """What a block is an example of; ``unknown`` for a yaml block that is none of them."""
    if example.lang == "python":
        return "python"
    try:
        data = yaml.safe_load(example.text)
    except yaml.YAMLError:
        return "unreadable"
    keys = set(data) if isinstance(data, dict) else set()
    if "version" in keys and "steps" in keys:
        return "plan"
    if "version" in keys and keys & {"rules", "default", "cedar", "cedar_inline"}:
        return "policy"
    if keys and keys <= CONFIG_SECTIONS:
        return "config" if {"tools", "policy"} <= keys else "config-section"
    return "unknown"


def _params() -> list[object]:
    skipped = [example for example in EXAMPLES if example.not_checked]
    params = []
    for example in EXAMPLES:
        if example.not_checked:
            number = skipped.index(example) + 1
            params.append(pytest.param(
                example,
                id=f"{example.where}:{example.lang}:not-checked-{number}-of-{len(skipped)}",
                marks=pytest.mark.skip(reason=f"not checked: {example.not_checked}"),
            ))
        else:
            params.append(pytest.param(example, id=f"{example.where}:{_kind(example)}"))
    return params


def _cedar_files(page: Path) -> dict[str, str]:
    """The Cedar files a page shows, by the name on their first line."""
    files = {}
    for block in BLOCKS:
        named = _CEDAR_NAME.fullmatch(block.first_line)
        if block.page == page and block.lang == "cedar" and named:
            files[named["name"]] = block.text
    return files


def _check_policy(example: Example, directory: Path) -> None:
    for name, text in _cedar_files(example.page).items():
        (directory / name).write_text(text, encoding="utf-8")
    path = directory / "policy.yaml"
    path.write_text(example.text, encoding="utf-8")
    Policy.from_file(path)


def _check_config(example: Example, directory: Path) -> None:
    raw = strict_yaml_load(example.text)
    path = directory / "callward.yaml"
    if {"tools", "policy"} <= set(raw):
        path.write_text(example.text, encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump({"tools": ["tools.py"], "policy": "policy.yaml", **raw}),
                        encoding="utf-8")
    load_config(path)
    if "mcp" in raw:
        parse_mcp_section(raw["mcp"], base=directory)
        parse_clients(raw["mcp"].get("clients"))
        parse_oidc(raw["mcp"].get("auth"), base=directory)


def _import_names(tree: ast.AST) -> list[tuple[str, str | None]]:
    """Each ``callward`` module a block imports, with the name it takes from it."""
    names: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "callward":
            names += [(node.module or "", alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [(alias.name, None) for alias in node.names
                      if alias.name.split(".")[0] == "callward"]
    return names


def _check_python(example: Example) -> None:
    tree = ast.parse(example.text, filename=example.where)
    compile(tree, example.where, "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for module_name, name in _import_names(tree):
            module = importlib.import_module(module_name)
            if name is not None and not hasattr(module, name):
                importlib.import_module(f"{module_name}.{name}")


class TestExamples:
    @pytest.mark.parametrize("example", _params())
    def test_example_is_valid(self, example, tmp_path):
        """
        Each yaml and python example of the README and docs/ validates as what it is:
        a policy, a plan, a configuration, or Python whose callward imports resolve.
        """
        kind = _kind(example)
        if kind == "unreadable":
            strict_yaml_load(example.text)  # raises, saying where the YAML breaks

        assert "unknown" != kind, (
            f"{example.where}: a yaml block that is no policy, plan or configuration; "
            "complete it, or mark it <!-- not checked: reason -->"
        )
        if kind == "policy":
            _check_policy(example, tmp_path)
        elif kind == "plan":
            parse_plan(example.text, source=example.where)
        elif kind in ("config", "config-section"):
            _check_config(example, tmp_path)
        else:
            _check_python(example)

    def test_examples_are_found(self):
        """The parser finds the examples: the README alone holds policies and Python."""
        kinds = {_kind(example) for example in EXAMPLES
                 if example.page.name == "README.md" and not example.not_checked}

        assert {"policy", "config", "python"} <= kinds

    def test_every_fence_is_closed(self):
        """An unclosed fence would swallow the rest of its page into one example."""
        assert [] == [block.where for block in BLOCKS if not block.closed]

    def test_every_policy_names_cedar_files_its_page_shows(self):
        """A policy example's Cedar files are on its page, so the example is whole."""
        missing = []
        for example in EXAMPLES:
            if not example.not_checked and _kind(example) == "policy":
                named = strict_yaml_load(example.text).get("cedar", [])
                shown = _cedar_files(example.page)
                missing += [f"{example.where}: {name}" for name in named if name not in shown]

        assert [] == missing


class TestQuickStart:
    @staticmethod
    def _file(name: str) -> str:
        """The README quick start's block whose first line names ``name``."""
        readme = ROOT / "README.md"
        (block,) = [example for example in EXAMPLES
                    if example.page == readme and example.first_line.startswith(f"# {name}")]
        return block.text

    def test_quick_start_call_is_allowed(self, tmp_path):
        """
        The quick start's tool, policy and configuration load together, and its call
        parses and is allowed for alice by the rule the policy names.
        """
        for name in ("tools.py", "policy.yaml", "callward.yaml"):
            (tmp_path / name).write_text(self._file(name), encoding="utf-8")
        config = load_config(tmp_path / "callward.yaml")
        registry = ToolRegistry()
        for source in config.tool_sources:
            registry.load(source)
        policy = Policy.from_file(config.policy_path)
        (call,) = parse_model_output('call function("square", [3], 9)',
                                     parameter_order=registry.parameter_order,
                                     new_id=lambda: "call_quickstart")
        decision = policy.decide(call, registry.get("square"), CallContext(principal="alice"))

        assert ("allow", {"x": 3}) == (decision.effect, call.arguments)
        assert "analysts-square" in decision.reasons


class TestLinks:
    @staticmethod
    def _anchors(page: Path) -> set[str]:
        """GitHub's anchors for a page's headings."""
        headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
        return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
                for heading in headings}

    @pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
    def test_relative_links_resolve(self, page):
        """Every relative link of a page names a file that exists, and a heading in it."""
        broken = []
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            missing_anchor = bool(anchor) and linked.suffix == ".md" and (
                not linked.exists() or anchor not in self._anchors(linked))
            if not linked.exists() or missing_anchor:
                broken.append(target)

        assert [] == broken

    def test_readme_links_every_docs_page(self):
        """No reference page is orphaned: the README links each one."""
        linked = set(_LINK.findall((ROOT / "README.md").read_text(encoding="utf-8")))
        pages = {f"docs/{page.name}" for page in PAGES if page.parent.name == "docs"}

        assert set() == pages - linked
