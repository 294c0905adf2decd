"""`callward demo` warms its sandbox before the first question, on a real engine."""

from __future__ import annotations

import os

from callward.core.cli._demo import _warm_sandbox
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path


def test_every_tool_profile_has_a_warm_container_before_the_first_question(engine, home):
    """Each limits profile of the demo's tools has a container ready; none outlives the gateway."""
    with Gateway.from_config(example_config_path(), home=home) as gateway:
        profiles, ready, seconds = _warm_sandbox(gateway)

        assert len({spec.limits for spec in gateway.registry}) == profiles
        assert profiles == ready
        assert seconds > 0

    mine = {"label": ["callward", f"callward.pid={os.getpid()}"]}
    assert [] == engine.api.containers(all=True, filters=mine)
