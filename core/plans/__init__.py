"""
Plans: a model (or a person) writes the steps once, each step runs through the gateway.

Example::

    >>> from callward.core.plans import parse_plan
    >>> parse_plan({"steps": [{"id": "a", "tool": "square", "arguments": {"x": 3}}]}).steps[0].id
    'a'
"""

from callward.core.plans._document import Plan, PlanInvalid, load_plan, parse_plan
from callward.core.plans._run import PlanReport, StepOutcome, run_plan, run_plan_file

__all__ = [
    "Plan",
    "PlanInvalid",
    "PlanReport",
    "StepOutcome",
    "load_plan",
    "parse_plan",
    "run_plan",
    "run_plan_file",
]
