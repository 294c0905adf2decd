"""
The gateway: every call parsed, decided, authorized, run and recorded, in that order.

``Gateway.from_config(path)`` builds one from ``callward.yaml``: the configuration
(``_config.py``) builds the parts, the gateway assembles them.

Example::

    >>> from callward.core.gateway import new_call_id
    >>> new_call_id().startswith("call_")
    True
"""

from callward.core.gateway._gateway import Gateway, new_call_id

__all__ = ["Gateway", "new_call_id"]
