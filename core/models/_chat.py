"""
Chat models that emit tool calls: the ``ChatModel`` protocol and its ``transformers`` backend.

Invariants:

- ``import callward.core`` never loads ``torch`` or ``transformers``: the backend
  imports them when a model is loaded.
- Nothing is fetched from a hub: ``HF_HUB_OFFLINE`` is set before ``transformers``
  is imported and every load is ``local_files_only``.
- A model has a digest (SHA-256 over the files it was loaded from) that every
  audit record it produced carries; what cannot be hashed is not loaded.
- Generation is greedy unless asked otherwise, so a run can be replayed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import structlog

from callward.core._canonical import JSONValue, Sha256Hex, canonical_bytes, sha256_hex
from callward.core.errors import ModelUnavailable

log = structlog.get_logger()

Role = Literal["system", "user", "assistant", "tool"]
ToolRole = Literal["tool", "user"]
ROLES: Final = frozenset({"system", "user", "assistant", "tool"})
WEIGHT_SUFFIXES: Final = (".safetensors", ".json", ".jinja", ".txt", ".model")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation, in the roles chat templates know."""

    role: Role
    content: str
    name: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError("a role is system, user, assistant or tool")

    def to_template(self) -> dict[str, str]:
        message = {"role": self.role, "content": self.content}
        if self.name:
            message["name"] = self.name
        return message


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    """How a turn is generated. Greedy by default, so a run can be replayed."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    max_prompt_tokens: int = 8192

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError("max_new_tokens must be in [1, 8192]")
        if not 1 <= self.max_prompt_tokens <= 131072:
            raise ValueError("max_prompt_tokens must be in [1, 131072]")


@dataclass(frozen=True, slots=True)
class ModelTurn:
    """
    One generated turn, with what the audit log records of it.

    Attributes:
        text: The model's output, special tokens removed.
        prompt_sha256: SHA-256 of the exact prompt text the template rendered.
        output_sha256: SHA-256 of ``text`` (UTF-8).
        prompt_tokens: Tokens in the prompt.
        output_tokens: Tokens generated (the end-of-turn token included).
        duration_seconds: Wall-clock time of the generation, template included.
    """

    text: str
    prompt_sha256: Sha256Hex
    output_sha256: Sha256Hex
    prompt_tokens: int
    output_tokens: int
    duration_seconds: float


class ChatModel(Protocol):
    """A chat model that sees the tools' JSON Schemas and answers with text (and calls)."""

    @property
    def model_id(self) -> str: ...

    @property
    def digest(self) -> Sha256Hex: ...

    @property
    def tool_role(self) -> ToolRole:
        """``tool`` when results go back in the template's tool role, ``user`` when folded."""
        ...

    def generate(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, JSONValue]]
    ) -> ModelTurn:
        """
        Generate the assistant's next turn.

        Raises:
            ModelUnavailable: The model cannot render the prompt or generate.
        """
        ...


def directory_digest(path: Path) -> Sha256Hex:
    """
    SHA-256 over the names and contents of a model directory's weight, config and
    tokenizer files, in name order: what a model was loaded from, in one value.
    """
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not any(p.suffix == ".safetensors" for p in files):
        raise ModelUnavailable(f"model directory {path} holds no safetensors weights")
    digest = hashlib.sha256()
    for file in files:
        digest.update(canonical_bytes({"name": file.name, "sha256": file_sha256(file)}))
    return Sha256Hex(digest.hexdigest())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def import_transformers() -> tuple[Any, Any]:
    """``torch`` and ``transformers``, imported offline; ModelUnavailable when absent."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import torch  # noqa: PLC0415 - heavy; loaded only with a model
        import transformers  # noqa: PLC0415
    except ImportError as exc:
        raise ModelUnavailable(
            "torch and transformers are not installed",
            remediation="run scripts/setup-venv.sh (installs callward[model])",
        ) from exc
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return torch, transformers


@dataclass
class TransformersChatModel:
    """
    A local ``transformers`` causal LM, prompted through its own chat template with ``tools=``.

    Construct with ``from_directory``; the constructor does no I/O.
    """

    model: Any
    tokenizer: Any
    model_id: str
    digest: Sha256Hex
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tool_role: ToolRole = "tool"

    @classmethod
    def from_directory(
        cls,
        path: Path,
        *,
        model_id: str | None = None,
        digest: Sha256Hex | None = None,
        generation: GenerationConfig | None = None,
        tool_role: ToolRole = "tool",
        dtype: str = "bfloat16",
    ) -> TransformersChatModel:
        """
        Load a model saved with ``save_pretrained`` (safetensors), offline.

        Args:
            digest: The digest to record; by default ``directory_digest(path)``.

        Raises:
            ModelUnavailable: The directory is missing, incomplete or not loadable.
        """
        if not path.is_dir():
            raise ModelUnavailable(f"model directory {path} does not exist")
        digest = digest or directory_digest(path)
        torch, transformers = import_transformers()
        started = time.perf_counter()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=getattr(torch, dtype), use_safetensors=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelUnavailable(
                f"model directory {path} cannot be loaded ({type(exc).__name__})"
            ) from exc
        model.eval()
        if tokenizer.chat_template is None:
            raise ModelUnavailable(f"model directory {path} has no chat template")
        log.info("model_loaded", model_id=model_id or path.name, digest=digest[:16],
                 seconds=round(time.perf_counter() - started, 3))
        return cls(model=model, tokenizer=tokenizer, model_id=model_id or path.name,
                   digest=digest, generation=generation or GenerationConfig(),
                   tool_role=tool_role)

    def render(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, JSONValue]]
    ) -> str:
        """The exact prompt text the model sees (its template, the tools, the generation cue)."""
        try:
            text = self.tokenizer.apply_chat_template(
                [message.to_template() for message in messages],
                tools=[dict(spec) for spec in tools] or None,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # jinja can raise anything: the template's boundary
            raise ModelUnavailable(
                f"the chat template could not render the conversation ({type(exc).__name__})"
            ) from exc
        if not isinstance(text, str):
            raise ModelUnavailable("the chat template did not render text")
        return text

    def generate(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, JSONValue]]
    ) -> ModelTurn:
        torch, _ = import_transformers()
        started = time.perf_counter()
        prompt = self.render(messages, tools)
        encoded = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        prompt_tokens = int(encoded["input_ids"].shape[1])
        if prompt_tokens > self.generation.max_prompt_tokens:
            raise ModelUnavailable(
                f"the prompt has {prompt_tokens} tokens, more than "
                f"max_prompt_tokens={self.generation.max_prompt_tokens}",
                remediation="shorten the conversation or raise the limit",
            )
        options: dict[str, Any] = {
            "max_new_tokens": self.generation.max_new_tokens,
            "do_sample": self.generation.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if self.generation.do_sample:
            options["temperature"] = self.generation.temperature
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            output = self.model.generate(**encoded, **options)
        new_tokens = output[0, prompt_tokens:]
        text = str(self.tokenizer.decode(new_tokens, skip_special_tokens=True)).strip()
        duration = time.perf_counter() - started
        log.info("model_turn", model_id=self.model_id, prompt_tokens=prompt_tokens,
                 output_tokens=int(new_tokens.shape[0]), seconds=round(duration, 3))
        return ModelTurn(
            text=text,
            prompt_sha256=sha256_hex(prompt.encode("utf-8", "surrogatepass")),
            output_sha256=sha256_hex(text.encode("utf-8", "surrogatepass")),
            prompt_tokens=prompt_tokens,
            output_tokens=int(new_tokens.shape[0]),
            duration_seconds=duration,
        )


def _conforms(model: TransformersChatModel) -> ChatModel:
    """mypy checks here that the backend satisfies the protocol."""
    return model
