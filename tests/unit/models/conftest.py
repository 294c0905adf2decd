"""
A tiny random-weight Qwen2 built here (a small byte-level BPE tokenizer and the Qwen
chat template shipped in the repository), so the real transformers loading and
generation code runs in seconds; a gateway with a real SQLite log and real keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from callward.core import (
    Execution,
    JSONValue,
    ResourceLimits,
    Sha256Hex,
    ToolCall,
    ToolSpec,
)
from callward.core.models._chat import ChatMessage, ModelTurn, ToolRole
from callward.core.testing import StubRunner, ok_execution

TEMPLATE = Path(__file__).resolve().parents[3] / "core" / "examples" / "qwen2-chat-template.jinja"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_qwen2(directory: Path, *, seed: int = 0) -> Path:
    """Train a 400-token BPE, wrap it with the Qwen template, save a 2-layer Qwen2."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    template = TEMPLATE.read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [template, 'What is 2 + 3? {"name": "add", "arguments": {"a": 2, "b": 3}}']
    tokenizer.train_from_iterator(corpus * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",  # noqa: S106 - a token, not a password
        pad_token="<|endoftext|>",  # noqa: S106
    )
    fast.chat_template = template
    config = transformers.Qwen2Config(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(name="tiny_model_dir", scope="session")
def _tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def run_demo_tool(spec: ToolSpec, call: ToolCall, limits: ResourceLimits) -> Execution:
    """The demo tools' results in-process: add and square computed, any other tool named."""
    arguments = call.arguments
    value: JSONValue
    if spec.name == "add":
        value = arguments["a"] + arguments["b"]  # type: ignore[operator]
    elif spec.name == "square":
        value = arguments["x"] * arguments["x"]  # type: ignore[operator]
    else:
        value = f"ran {spec.name}"
    return ok_execution(value)


class StubChatModel:
    """Canned model turns, in order: the agent loop's logic without a model's whims."""

    def __init__(self, outputs: Sequence[str], *, tool_role: ToolRole = "tool") -> None:
        self._outputs = iter(outputs)
        self.seen: list[list[ChatMessage]] = []
        self.tools: list[object] = []
        self.required: list[bool] = []  # per turn: was it asked to be a call?
        self._tool_role: ToolRole = tool_role

    @property
    def model_id(self) -> str:
        return "stub"

    @property
    def digest(self) -> Sha256Hex:
        return Sha256Hex("cd" * 32)

    @property
    def tool_role(self) -> ToolRole:
        return self._tool_role

    def generate(self, messages, tools, *, require_call: bool = False) -> ModelTurn:
        self.seen.append(list(messages))
        self.tools = list(tools)
        self.required.append(require_call)
        text = next(self._outputs)
        return ModelTurn(text, Sha256Hex("01" * 32), Sha256Hex("02" * 32), 10, 5, 0.01,
                         call_required=require_call)


@pytest.fixture(name="stub_model")
def _stub_model() -> type[StubChatModel]:
    """The StubChatModel class, to build one per test with its canned turns."""
    return StubChatModel


@pytest.fixture(name="runner")
def _runner() -> StubRunner:
    """A StubRunner of the demo tools (a unit test starts no container)."""
    return StubRunner(run_demo_tool)
