"""
The in-container model server: load one model once, then answer one request per line.

It runs inside a hardened sandbox container (see ``callward.sandbox._model_worker``)
as ``python3 -S -B /opt/callward/model_server.py --task TASK --weights DIR ...``, with
the host's ``torch``/``transformers`` site-packages and the weights mounted read-only,
no network and ``HF_HUB_OFFLINE=1``. The protocol:

- after loading, stdout carries one line ``{"ready": true, "load_ms": ...}``; a load
  that fails writes one runner-style failure line and exits 1;
- then stdin carries one request per line, ``{"op": str, "arguments": {...}}``, and
  stdout carries exactly one result line per request, in the sandbox runner's own
  vocabulary: ``{"ok": true, "value": ...}`` or ``{"ok": false, "kind": "tool_error",
  "error_type": ..., "message": ...}`` (``memory_limit`` for a ``MemoryError``).

Invariants:

- Nothing but this server writes to the result stream: file descriptor 1 (and
  ``sys.stdout``) is pointed at stderr before ``torch`` is imported; results go to
  a private duplicate of the original stdout.
- Every answer is a pure function of the weights, the dtype, the request and (for
  ``embed``) the collection: decoding is greedy, and nothing of one request is kept for
  the next but the key/value caches of the fixed task prompts' leading tokens (the
  system message and the instruction before the text), keyed by their exact token
  ids; a request continues from a copy of one, never from the kept cache itself.
- The generator computes in ``--dtype``; ``auto`` is bfloat16 only where the CPU has
  bfloat16 arithmetic (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``), float32
  otherwise: the rule of ``callward.core.models._cpu.choose_dtype``, which this
  server, run without callward on its path, repeats (a unit test holds them equal);
  so does ``store_for_decoding``, which lays the float32 weights of widening linear
  layers out input-major (same numbers, faster decoding), and ``prompts_in_float32``,
  with which a bfloat16 set for a CPU without bfloat16 arithmetic computes its prompts
  in float32.
- The host bounds each request's time and kills the container past it; the server
  itself never decides that a request ran too long.
"""

from __future__ import annotations

import argparse
import collections
import copy
import inspect
import json
import math
import os
import sys
import time
from typing import Any, Final

MAX_MESSAGE_CHARS: Final = 500
MAX_REQUEST_BYTES: Final = 1 << 20
SENTIMENT_LABELS: Final = ("positive", "negative", "neutral")
SUMMARY_SYSTEM: Final = "You are a careful news editor. You write short, factual summaries."
SENTIMENT_SYSTEM: Final = "You classify the sentiment of texts."
_EMBED_MAX_TOKENS: Final = 256
NATIVE_BF16_FLAGS: Final = ("avx512_bf16", "amx_bf16")
PREFIX_CACHE_ENTRIES: Final = 4


def choose_dtype(flags: frozenset[str], requested: str, *,
                 float32_copies_allowed: bool = True) -> tuple[str, str, bool]:
    """
    The dtype to load the generator in, why, and whether its prompts are computed in
    float32 (see ``core.models._cpu``).
    """
    if requested == "float32":
        return requested, "set in the configuration", False
    if requested == "bfloat16":
        return requested, "set in the configuration", flags.isdisjoint(NATIVE_BF16_FLAGS)
    for flag in NATIVE_BF16_FLAGS:
        if flag in flags:
            return "bfloat16", f"cpu flag {flag}: native bfloat16", False
    missing = f"no {' or '.join(NATIVE_BF16_FLAGS)} cpu flag"
    if "avx2" in flags and float32_copies_allowed:
        return "bfloat16", f"cpu flag avx2, {missing}: bfloat16 weights", True
    return "float32", f"{missing}: bfloat16 would be emulated", False


def generator_dtype(flags: frozenset[str], requested: str) -> tuple[str, str, bool]:
    """
    ``choose_dtype`` for this worker: ``auto`` never takes float32 prompt copies here.
    With them the demo model would hold 1.0 GB of bfloat16 weights, 1.4 GB of copies and
    0.5 GB more for the vocabulary head, which sentiment multiplies by every position:
    about 2.9 GB against float32's 2.0 GB, in a worker whose memory limit is sized for
    float32. An explicit ``bfloat16`` still gets them.
    """
    return choose_dtype(flags, requested, float32_copies_allowed=False)


def store_for_decoding(torch: Any, model: Any, dtype: str) -> int:
    """Widening float32 linear weights stored input-major (see ``core.models._cpu``)."""
    if dtype != "float32":
        return 0
    changed = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and module.out_features > module.in_features
                and module.weight.dtype == torch.float32 and module.weight.is_contiguous()):
            module.weight.data = module.weight.data.t().contiguous().t()
            changed += 1
    return changed


def prompts_in_float32(torch: Any, model: Any) -> int:
    """bfloat16 products of several rows in float32 (see ``core.models._cpu``)."""
    changed = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.bfloat16
                and not isinstance(module.__dict__.get("forward"), _RowsInFloat32)):
            module.forward = _RowsInFloat32(torch, module)
            changed += 1
    return changed


class _RowsInFloat32:
    """One linear layer's forward for ``prompts_in_float32``."""

    def __init__(self, torch: Any, layer: Any) -> None:
        self._torch = torch
        self._layer = layer
        self._weight: Any = None
        self._bias: Any = None

    def __call__(self, rows: Any) -> Any:
        linear = self._torch.nn.functional.linear
        layer = self._layer
        if rows.numel() == rows.shape[-1]:
            return linear(rows, layer.weight, layer.bias)
        if self._weight is None:
            with self._torch.inference_mode(False), self._torch.no_grad():
                self._bias = None if layer.bias is None else layer.bias.detach().float()
                self._weight = layer.weight.detach().float()
        return linear(rows.float(), self._weight, self._bias).to(rows.dtype)


def _last_logits_only(model: Any) -> dict[str, int]:
    """``logits_to_keep=1`` where the forward takes it (see ``core.models._chat``)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
            for line in stream:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


class _Results:
    """The private result stream: a duplicate of the original stdout, one line per write."""

    def __init__(self) -> None:
        self._fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def write(self, value: dict[str, Any]) -> None:
        line = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
        data = line.encode("ascii") + b"\n"
        while data:
            written = os.write(self._fd, data)
            data = data[written:]


def _failure(exc: BaseException) -> dict[str, Any]:
    kind = "memory_limit" if isinstance(exc, MemoryError) else "tool_error"
    return {"ok": False, "kind": kind, "error_type": type(exc).__name__,
            "message": _truncate(str(exc))}


class RequestError(ValueError):
    """A request this server refuses (unknown op, a bad argument)."""


def _text(arguments: dict[str, Any], name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{name} must be a non-empty string")
    return value


def _int(arguments: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = arguments.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}]")
    return value


class EmbedServer:
    """Embedding retrieval: mean-pooled, L2-normalised sentence embeddings, cosine top-k."""

    def __init__(self, torch: Any, transformers: Any, weights: str, collection: str) -> None:
        self._torch = torch
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(weights, local_files_only=True)
        self._model = transformers.AutoModel.from_pretrained(
            weights, local_files_only=True, use_safetensors=True
        ).eval()
        with open(collection, encoding="utf-8") as stream:
            self._documents = [json.loads(line) for line in stream if line.strip()]
        texts = [f"{d['title']}. {d['text']}" for d in self._documents]
        self._matrix = self._embed(texts)

    @property
    def documents(self) -> int:
        return len(self._documents)

    def _embed(self, texts: list[str]) -> Any:
        torch = self._torch
        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), 16):
                batch = self._tokenizer(
                    texts[start : start + 16], padding=True, truncation=True,
                    max_length=_EMBED_MAX_TOKENS, return_tensors="pt",
                )
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                parts.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
        return torch.cat(parts) if parts else torch.zeros((0, 1))

    def handle(self, op: str, arguments: dict[str, Any]) -> Any:
        if op != "embed_search":
            raise RequestError(f"this worker does not serve {op}")
        query = _text(arguments, "query")
        k = _int(arguments, "k", 3, 1, 20)
        scores = (self._matrix @ self._embed([query])[0]).tolist()
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
        return {"hits": [
            {"id": self._documents[i]["id"], "title": self._documents[i]["title"],
             "score": round(float(scores[i]), 4), "text": self._documents[i]["text"]}
            for i in order
        ]}


class PrefixCache:
    """Key/value caches of prompt prefixes by exact token ids, least recently used dropped."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.hits = 0
        self._entries: collections.OrderedDict[tuple[int, ...], Any] = \
            collections.OrderedDict()

    def copy_of(self, key: tuple[int, ...]) -> Any | None:
        cache = self._entries.get(key)
        if cache is None:
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return copy.deepcopy(cache)

    def keep(self, key: tuple[int, ...], cache: Any) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = cache
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class GenerateServer:
    """
    Summaries and sentiment from one causal LM with a chat template, greedy.

    Each task's prompt starts the same way (its system message and the instruction
    before the text): the keys and values of those tokens are computed once and kept
    (``PrefixCache``), and each request computes only the rest, from a copy.
    """

    def __init__(self, torch: Any, transformers: Any, weights: str, max_input_tokens: int,
                 *, dtype: str = "bfloat16", prefix_cache_entries: int = PREFIX_CACHE_ENTRIES,
                 float32_prompts: bool = False) -> None:
        self._torch = torch
        self._dynamic_cache = transformers.DynamicCache
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(weights, local_files_only=True)
        self._model = transformers.AutoModelForCausalLM.from_pretrained(
            weights, local_files_only=True, use_safetensors=True, dtype=getattr(torch, dtype)
        ).eval()
        store_for_decoding(torch, self._model, dtype)
        if float32_prompts:
            prompts_in_float32(torch, self._model)
        self._max_input_tokens = max_input_tokens
        self.prefix_cache = PrefixCache(prefix_cache_entries)

    def _render(self, system: str, user: str, *, tokenize: bool) -> Any:
        return self._tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            add_generation_prompt=True, tokenize=tokenize,
        )

    def _prompt_ids(self, system: str, user: str) -> list[int]:
        ids = self._render(system, user, tokenize=True)
        if hasattr(ids, "input_ids"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        ids = list(ids)
        if len(ids) > self._max_input_tokens:
            raise RequestError(
                f"the prompt has {len(ids)} tokens, more than {self._max_input_tokens}")
        return ids

    def _fixed_prefix(self, system: str, head: str, text: str, ids: list[int]) -> tuple[int, ...]:
        """
        The prompt's leading tokens that do not depend on ``text``: the tokens of the
        rendered prompt up to the end of ``head``, as far as they agree with ``ids`` (a
        token spanning the boundary is left to the request). At least one token of the
        prompt is always left to compute.
        """
        rendered = self._render(system, head + text, tokenize=False)
        end = rendered.rfind(head + text) if isinstance(rendered, str) else -1
        if end < 0:
            return ()
        prefix = self._tokenizer(rendered[: end + len(head)],
                                 add_special_tokens=False)["input_ids"]
        length = 0
        for cached, actual in zip(prefix, ids[:-1], strict=False):
            if cached != actual:
                break
            length += 1
        return tuple(ids[:length])

    def _cache_for(self, prefix: tuple[int, ...]) -> Any | None:
        """A copy of the prefix's key/value cache (computed and kept on a miss)."""
        if not prefix or self.prefix_cache.max_entries == 0:
            return None
        cache = self.prefix_cache.copy_of(prefix)
        if cache is None:
            kept = self._dynamic_cache(config=self._model.config)
            self._model(self._torch.tensor([prefix]), past_key_values=kept, use_cache=True,
                        **_last_logits_only(self._model))
            self.prefix_cache.keep(prefix, kept)
            cache = copy.deepcopy(kept)
        return cache

    def handle(self, op: str, arguments: dict[str, Any]) -> Any:
        if op == "summarize":
            return self._summarize(arguments)
        if op == "sentiment":
            return self._sentiment(arguments)
        raise RequestError(f"this worker does not serve {op}")

    def _summarize(self, arguments: dict[str, Any]) -> Any:
        torch = self._torch
        text = _text(arguments, "text")
        max_words = _int(arguments, "max_words", 40, 5, 200)
        head = f"Summarise this article in at most {max_words} words.\n\n"
        ids = self._prompt_ids(SUMMARY_SYSTEM, head + text)
        with torch.inference_mode():
            cache = self._cache_for(self._fixed_prefix(SUMMARY_SYSTEM, head, text, ids))
            output = self._model.generate(
                torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                max_new_tokens=max_words * 2, do_sample=False, num_beams=1,
                pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
                **({} if cache is None else {"past_key_values": cache}),
            )
        summary = self._tokenizer.decode(output[0][len(ids):], skip_special_tokens=True).strip()
        return {"summary": summary, "input_tokens": len(ids),
                "output_tokens": int(output.shape[1]) - len(ids)}

    def _sentiment(self, arguments: dict[str, Any]) -> Any:
        torch = self._torch
        text = _text(arguments, "text")
        head = ("Is the sentiment of this text positive, negative or neutral? "
                "Answer with one word.\n\nText: ")
        ids = self._prompt_ids(SENTIMENT_SYSTEM, head + text)
        # Each label's log-probability as the continuation of the prompt: the answer
        # is always one of the three labels, never free text to be parsed. The prompt
        # runs once; a label of several tokens continues from a copy of its cache.
        logprobs = {}
        with torch.inference_mode():
            cache = self._cache_for(self._fixed_prefix(SENTIMENT_SYSTEM, head, text, ids))
            # Every position's logits, not _last_logits_only: the head's product with one
            # row sliced from the others is summed in an order that follows the row's
            # place in memory, and the cached and one-pass scores then differed in the
            # fourth decimal (float32, the demo model).
            if cache is None:
                prompt = self._model(torch.tensor([ids]), use_cache=True)
            else:
                done = cache.get_seq_length()
                prompt = self._model(torch.tensor([ids[done:]]), past_key_values=cache,
                                     use_cache=True)
            first = torch.log_softmax(prompt.logits[0, -1].float(), dim=-1)
            for label in SENTIMENT_LABELS:
                label_ids = self._tokenizer.encode(label, add_special_tokens=False)
                total = float(first[label_ids[0]])
                if len(label_ids) > 1:
                    cache = copy.deepcopy(prompt.past_key_values)
                    rest = self._model(torch.tensor([label_ids[:-1]]), past_key_values=cache,
                                       use_cache=True).logits[0].float()
                    total += float(torch.log_softmax(rest, dim=-1).gather(
                        1, torch.tensor(label_ids[1:]).unsqueeze(1)).sum())
                logprobs[label] = total
        top = max(logprobs.values())
        weights = {label: math.exp(value - top) for label, value in logprobs.items()}
        norm = sum(weights.values())
        # Ties go to the earlier label, so the answer never depends on dict order.
        label = max(SENTIMENT_LABELS,
                    key=lambda name: (logprobs[name], -SENTIMENT_LABELS.index(name)))
        return {"label": label,
                "scores": {name: round(weights[name] / norm, 4) for name in SENTIMENT_LABELS}}


def _request(line: bytes) -> tuple[str, dict[str, Any]]:
    """
    Raises:
        RequestError: The line is not ``{"op": str, "arguments": {...}}``.
    """
    request = json.loads(line)
    if not isinstance(request, dict) or not isinstance(request.get("op"), str) \
            or not isinstance(request.get("arguments"), dict):
        raise RequestError("a request is an object with op and arguments")
    return request["op"], request["arguments"]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="model_server")
    parser.add_argument("--task", choices=("embed", "generate"), required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--collection", default="")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-input-tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    return parser.parse_args()


def main() -> None:
    results = _Results()
    options = _arguments()
    started = time.monotonic()
    try:
        import torch  # noqa: PLC0415 - after fd 1 points at stderr
        import transformers  # noqa: PLC0415

        torch.set_num_threads(max(1, options.threads))
        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        server: EmbedServer | GenerateServer
        dtype, reason, float32_prompts = generator_dtype(cpu_flags(), options.dtype)
        if options.task == "embed":
            # A 22M-parameter encoder: float32 always; a text is embedded whole, so
            # there is no shared prefix to keep.
            dtype, reason = "float32", "the embedding model runs in float32"
            server = EmbedServer(torch, transformers, options.weights, options.collection)
        else:
            server = GenerateServer(torch, transformers, options.weights,
                                    options.max_input_tokens, dtype=dtype,
                                    float32_prompts=float32_prompts)
            if float32_prompts:
                reason += ", prompts computed in float32"
    except BaseException as exc:  # noqa: BLE001 - reported to the host, then exit
        results.write(_failure(exc))
        os._exit(1)
    ready: dict[str, Any] = {"ready": True, "load_ms": round((time.monotonic() - started) * 1000),
                             "dtype": dtype, "dtype_reason": reason}
    if isinstance(server, EmbedServer):
        ready["documents"] = server.documents
    results.write(ready)
    while True:
        line = sys.stdin.buffer.readline(MAX_REQUEST_BYTES + 1)
        if not line:
            break
        try:
            op, arguments = _request(line)
            results.write({"ok": True, "value": server.handle(op, arguments)})
        except Exception as exc:  # noqa: BLE001 - every failure (MemoryError too) is one line
            results.write(_failure(exc))
    os._exit(0)


if __name__ == "__main__":
    main()
