"""
The agent loop: a chat model proposes tool calls, the gateway decides and runs them.

Example::

    >>> from callward.core.agent import AgentLimits
    >>> AgentLimits(max_steps=3).max_steps
    3
"""

from callward.core.agent._loop import Agent, AgentLimits, AgentRun, AgentStep

__all__ = ["Agent", "AgentLimits", "AgentRun", "AgentStep"]
