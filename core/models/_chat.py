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
- The model computes in the dtype ``choose_dtype`` picks from the CPU's flags (bfloat16
  only where the CPU has bfloat16 arithmetic) unless the configuration names one; a
  bfloat16 copy loaded as float32 is cast exactly, so both start from the same values.
- The key/value cache of a prompt's shared prefix (the system messages and the tool
  definitions, as the template renders them) is kept between turns, keyed by the exact
  token ids of that prefix: other tools or another template give another key, never a
  stale cache. Each generation continues from a copy, so the kept cache is never
  changed, and the tokens generated are those of the same prompt computed without it
  (tests/integration/models/test_prefix_cache.py compares them on the demo model).
- A turn asked to be a call (``require_call``, the local form of the chat API's
  ``tool_choice: "required"``) starts with ``CALL_OPENING``, the opening of the bare
  call object every dialect of callward's parser reads; the opening is part of the
  hashed prompt and of the turn's text, and the turn says it was required
  (``call_required``), so the record never passes callward's words off as the model's.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import structlog

from callward.core._canonical import JSONValue, Sha256Hex, canonical_bytes, sha256_hex
from callward.core.errors import ModelUnavailable
from callward.core.models._cpu import (
    DtypeChoice,
    choose_dtype,
    cpu_flags,
    prompts_in_float32,
    store_for_decoding,
    usable_cpus,
)
from callward.core.types import ToolCall

log = structlog.get_logger()

Role = Literal["system", "user", "assistant", "tool"]
ToolRole = Literal["tool", "user"]
ROLES: Final = frozenset({"system", "user", "assistant", "tool"})
WEIGHT_SUFFIXES: Final = (".safetensors", ".json", ".jinja", ".txt", ".model")
#: How a turn that must be a call starts: the model writes the tool's name and arguments.
CALL_OPENING: Final = '{"name": "'


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """
    One message of a conversation, in the roles chat templates know.

    Attributes:
        tool_call_id: On a ``tool`` message, the id of the call it answers (a served
            model's API pairs them); templates of local models do not use it.
        calls: On an ``assistant`` message, the calls callward read from it, so that an
            API that pairs results with calls sees them; ``to_template`` leaves them out.
    """

    role: Role
    content: str
    name: str = ""
    tool_call_id: str = ""
    calls: tuple[ToolCall, ...] = ()

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
        dtype: What the weights computed in (``float32``, ``bfloat16``); empty where
            the model does not say (a served model).
        prompts_in_float32: bfloat16 weights whose products of several rows (the
            prompt) were computed in float32 (``prompts_in_float32``, a CPU without
            bfloat16 arithmetic): a replay elsewhere must compute them so to match.
        cached_prompt_tokens: Leading prompt tokens whose keys and values came from the
            prefix cache instead of being computed again (0: none).
        call_required: The turn was asked to be a call (``require_call``): a local
            model's text then starts with ``CALL_OPENING``, which callward wrote.
    """

    text: str
    prompt_sha256: Sha256Hex
    output_sha256: Sha256Hex
    prompt_tokens: int
    output_tokens: int
    duration_seconds: float
    dtype: str = ""
    cached_prompt_tokens: int = 0
    #: A served model's whole API response (``chat.completion``): the parser reads the
    #: calls from it, with its rules (finish_reason, choices), instead of from ``text``.
    response: Mapping[str, JSONValue] | None = None
    #: What ``model.turn`` records of a served model beside id and digest (endpoint,
    #: the model the server reports, finish_reason, usage); None for a local model.
    served: Mapping[str, JSONValue] | None = None
    call_required: bool = False
    prompts_in_float32: bool = False


class ChatModel(Protocol):
    """A chat model that sees the tools' JSON Schemas and answers with text (and calls)."""

    @property
    def model_id(self) -> str: ...

    @property
    def digest(self) -> Sha256Hex | None:
        """SHA-256 of the weights; None for a served model, whose weights callward never sees."""
        ...

    @property
    def tool_role(self) -> ToolRole:
        """``tool`` when results go back in the template's tool role, ``user`` when folded."""
        ...

    def generate(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, JSONValue]],
        *,
        require_call: bool = False,
    ) -> ModelTurn:
        """
        Generate the assistant's next turn.

        Args:
            require_call: The turn must be a call of one of ``tools`` (the chat API's
                ``tool_choice: "required"``); which tool and arguments is the model's
                choice, and the call is checked by the policy like any other.

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


class PrefixCache:
    """
    Key/value caches of prompt prefixes, keyed by their exact token ids, least recently
    used dropped first.

    A kept cache is never handed out itself: ``copy_of`` returns a deep copy, which the
    generation extends, so one turn cannot leak into the next.

    Args:
        max_entries: How many prefixes to keep (0 keeps none: every prompt is computed
            in full). A prefix of the demo model takes about 24 KiB a token in float32.
    """

    def __init__(self, max_entries: int = 4) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be at least 0")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def copy_of(self, key: tuple[int, ...]) -> Any | None:
        """A deep copy of the cache kept for ``key``, or None (counted as a miss)."""
        with self._lock:
            cache = self._entries.get(key)
            if cache is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return copy.deepcopy(cache)

    def keep(self, key: tuple[int, ...], cache: Any) -> None:
        """Keep ``cache`` (which the caller no longer changes) for ``key``."""
        if self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = cache
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@dataclass
class TransformersChatModel:
    """
    A local ``transformers`` causal LM, prompted through its own chat template with ``tools=``.

    Construct with ``from_directory``; the constructor does no I/O.

    Attributes:
        dtype_choice: The dtype the weights were loaded in and why (None: not recorded).
        prefix_cache: The kept key/value caches of shared prompt prefixes.
    """

    model: Any
    tokenizer: Any
    model_id: str
    digest: Sha256Hex
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    tool_role: ToolRole = "tool"
    dtype_choice: DtypeChoice | None = None
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)

    @property
    def dtype(self) -> str:
        return "" if self.dtype_choice is None else self.dtype_choice.dtype

    @classmethod
    def from_directory(
        cls,
        path: Path,
        *,
        model_id: str | None = None,
        digest: Sha256Hex | None = None,
        generation: GenerationConfig | None = None,
        tool_role: ToolRole = "tool",
        dtype: str = "auto",
        prefix_cache_entries: int = 4,
        threads: int | None = None,
        flags: Iterable[str] | None = None,
    ) -> TransformersChatModel:
        """
        Load a model saved with ``save_pretrained`` (safetensors), offline.

        Args:
            digest: The digest to record; by default ``directory_digest(path)``.
            dtype: ``auto`` (bfloat16 where the CPU computes it natively; bfloat16
                weights with float32 prompts on another AVX2 CPU; else float32:
                ``choose_dtype``), ``float32`` or ``bfloat16``. Weights stored in another
                dtype are cast on load.
            prefix_cache_entries: How many shared prompt prefixes to keep (0: none).
            threads: ``torch``'s intra-op threads; by default every CPU this process
                may run on. ``torch`` counts physical cores, which leaves half of a
                machine whose CPUs are hyper-threads of one core idle.
            flags: The CPU's flags the dtype is chosen from; by default those of
                ``/proc/cpuinfo`` (``cpu_flags``). A benchmark passes another CPU's.

        Raises:
            ModelUnavailable: The directory is missing, incomplete or not loadable.
            ValueError: ``dtype`` is not one of the three.
        """
        choice = choose_dtype(cpu_flags() if flags is None else flags, dtype)
        if not path.is_dir():
            raise ModelUnavailable(f"model directory {path} does not exist")
        digest = digest or directory_digest(path)
        torch, transformers = import_transformers()
        torch.set_num_threads(threads or usable_cpus())
        started = time.perf_counter()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=getattr(torch, choice.dtype),
                use_safetensors=True,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelUnavailable(
                f"model directory {path} cannot be loaded ({type(exc).__name__})"
            ) from exc
        model.eval()
        input_major = store_for_decoding(torch, model, choice.dtype)
        float32_prompts = prompts_in_float32(torch, model) if choice.prompts_in_float32 else 0
        if tokenizer.chat_template is None:
            raise ModelUnavailable(f"model directory {path} has no chat template")
        log.info("model_loaded", model_id=model_id or path.name, digest=digest[:16],
                 dtype=choice.dtype, dtype_reason=choice.reason,
                 threads=torch.get_num_threads(), input_major_weights=input_major,
                 float32_prompt_layers=float32_prompts,
                 seconds=round(time.perf_counter() - started, 3))
        return cls(model=model, tokenizer=tokenizer, model_id=model_id or path.name,
                   digest=digest, generation=generation or GenerationConfig(),
                   tool_role=tool_role, dtype_choice=choice,
                   prefix_cache=PrefixCache(prefix_cache_entries))

    def render(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, JSONValue]]
    ) -> str:
        """The exact prompt text the model sees (its template, the tools, the generation cue)."""
        return self._render(messages, tools, add_generation_prompt=True)

    def _render(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, JSONValue]],
        *,
        add_generation_prompt: bool,
    ) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                [message.to_template() for message in messages],
                tools=[dict(spec) for spec in tools] or None,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # jinja can raise anything: the template's boundary
            raise ModelUnavailable(
                f"the chat template could not render the conversation ({type(exc).__name__})"
            ) from exc
        if not isinstance(text, str):
            raise ModelUnavailable("the chat template did not render text")
        return text

    def shared_prefix(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, JSONValue]],
        prompt: str,
        prompt_ids: Sequence[int],
    ) -> tuple[int, ...]:
        """
        The token ids of the prompt's shared prefix: the leading system messages with
        the tool definitions, as the template renders them alone.

        Empty (nothing to cache) when there is no leading system message, or when that
        rendering is not a prefix of the prompt's own tokens (a template that renders
        the system part differently once more messages follow, or a token that spans
        the boundary): the prompt is then computed in full, never from a near miss.
        """
        leading = 0
        while leading < len(messages) and messages[leading].role == "system":
            leading += 1
        if leading == 0 or leading == len(messages):
            return ()
        try:
            text = self._render(messages[:leading], tools, add_generation_prompt=False)
        except ModelUnavailable:
            return ()
        if not text or not prompt.startswith(text):
            return ()
        ids = tuple(int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not 0 < len(ids) < len(prompt_ids) or tuple(prompt_ids[: len(ids)]) != ids:
            return ()
        return ids

    def _prefix_cache_for(self, torch: Any, prefix: tuple[int, ...]) -> tuple[Any, bool]:
        """
        A copy of the prefix's key/value cache, computing and keeping it on a miss, and
        whether it was kept already. A miss computes the prefix alone, as a hit's copy
        was computed, so a turn's tokens do not depend on which it was.
        """
        cache = self.prefix_cache.copy_of(prefix)
        if cache is not None:
            return cache, True
        from transformers import DynamicCache  # noqa: PLC0415 - loaded with the model

        kept = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.tensor([prefix]), past_key_values=kept, use_cache=True,
                   **last_logits_only(self.model))
        self.prefix_cache.keep(prefix, kept)
        return copy.deepcopy(kept), False

    def generate(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, JSONValue]],
        *,
        require_call: bool = False,
    ) -> ModelTurn:
        torch, _ = import_transformers()
        started = time.perf_counter()
        opening = CALL_OPENING if require_call and tools else ""
        prompt = self.render(messages, tools) + opening
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
        prefix: tuple[int, ...] = ()
        if self.prefix_cache.max_entries:
            prefix = self.shared_prefix(messages, tools, prompt,
                                        encoded["input_ids"][0].tolist())
        reused = False
        with torch.inference_mode():
            if prefix:
                options["past_key_values"], reused = self._prefix_cache_for(torch, prefix)
            output = self.model.generate(**encoded, **options)
        new_tokens = output[0, prompt_tokens:]
        text = (opening + str(self.tokenizer.decode(new_tokens, skip_special_tokens=True))).strip()
        duration = time.perf_counter() - started
        log.info("model_turn", model_id=self.model_id, prompt_tokens=prompt_tokens,
                 prefix_tokens=len(prefix), prefix_reused=reused,
                 output_tokens=int(new_tokens.shape[0]), seconds=round(duration, 3))
        return ModelTurn(
            text=text,
            prompt_sha256=sha256_hex(prompt.encode("utf-8", "surrogatepass")),
            output_sha256=sha256_hex(text.encode("utf-8", "surrogatepass")),
            prompt_tokens=prompt_tokens,
            output_tokens=int(new_tokens.shape[0]),
            duration_seconds=duration,
            dtype=self.dtype,
            cached_prompt_tokens=len(prefix) if reused else 0,
            call_required=bool(opening),
            prompts_in_float32=(self.dtype_choice is not None
                                and self.dtype_choice.prompts_in_float32),
        )


def last_logits_only(model: Any) -> dict[str, int]:
    """
    The forward argument that computes the vocabulary's logits for the last position
    only (``logits_to_keep=1``), or none where the model's forward does not take it.

    Computing a shared prefix keeps only its key/value cache: the logits of its 650-odd
    positions would each be a product with the whole vocabulary head (151,936 rows for the
    demo model), about a quarter of the prefix's time, thrown away. The cache is the same
    either way.
    """
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


def _conforms(model: TransformersChatModel) -> ChatModel:
    """mypy checks here that the backend satisfies the protocol."""
    return model
