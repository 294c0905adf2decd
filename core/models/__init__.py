"""
The model side: chat models that propose tool calls (local ``transformers`` models,
and any OpenAI-compatible server: ``EndpointChatModel``), and the offline demo model.

Nothing here imports ``torch`` or ``transformers`` until a model is loaded; the model
tools (models run as tools in the sandbox) live in ``callward.core.models._tools``,
which needs the sandbox, and are built by the gateway's configuration.

Example::

    >>> from callward.core.models import ChatMessage
    >>> ChatMessage(role="user", content="square 3").role
    'user'
"""

from callward.core.models._chat import (
    ChatMessage,
    ChatModel,
    GenerationConfig,
    ModelTurn,
    TransformersChatModel,
)
from callward.core.models._endpoint import EndpointChatModel
from callward.core.models._gguf import DEMO_MODEL_SHA256, load_demo_model

__all__ = [
    "DEMO_MODEL_SHA256",
    "ChatMessage",
    "ChatModel",
    "EndpointChatModel",
    "GenerationConfig",
    "ModelTurn",
    "TransformersChatModel",
    "load_demo_model",
]
