"""
The tool registry: tools by name and version, each pinned by the digest of its source.

Part of the kernel: it imports nothing but the kernel's own modules. ``LiveRegistry``
loads and unloads versions at run time through a registry database (a ``LiveStore``:
the home's ``RegistryStore``, or a fleet's ``PostgresRegistryStore``), recording each
change in the audit log it is handed.

Example::

    >>> from callward.core.registry import tool
    >>> mark = tool(version="1.0.0", parameters={"type": "object"})
    >>> callable(mark)
    True
"""

from callward.core.registry._live import LiveRegistry, LiveStore
from callward.core.registry._registry import ToolRegistry
from callward.core.registry._spec import tool
from callward.core.registry._store import RegistryChange, RegistryStore
from callward.core.registry._store_postgres import PostgresRegistryStore

__all__ = [
    "LiveRegistry",
    "LiveStore",
    "PostgresRegistryStore",
    "RegistryChange",
    "RegistryStore",
    "ToolRegistry",
    "tool",
]
