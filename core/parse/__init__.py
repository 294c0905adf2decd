"""
Parsing of model output: every tool call a model emitted, in any dialect, as ``ToolCall``.

Part of the kernel: it imports nothing but the kernel's own modules.

Example::

    >>> from callward.core.parse import parse_model_output
    >>> [call.name for call in parse_model_output('call function("square", [3], 9)')]
    ['square']
"""

from callward.core.parse._front import MAX_CALLS_PER_MESSAGE, parse_model_output

__all__ = ["MAX_CALLS_PER_MESSAGE", "parse_model_output"]
