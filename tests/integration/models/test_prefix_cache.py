"""
The real demo model in float32 and in bfloat16: a turn computed from the kept key/value
cache of the shared prefix (system prompt and tool definitions) is token for token the
turn computed in full; the model-tool worker's summaries and sentiment scores are the
same with and without its task-prompt cache; a float32 model loaded from the bfloat16
copy holds exactly the copy's values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from safetensors.torch import load_file

from callward.core.agent import Agent
from callward.core.gateway import Gateway
from callward.core.gateway._config import example_config_path
from callward.core.models._chat import ChatMessage, PrefixCache, TransformersChatModel
from callward.core.models._gguf import prepare_demo_model
from callward.core.models._tools import example_collection_path
from tests._modules import module_from_file

SERVER = Path(__file__).resolve().parents[3] / "sandbox" / "image" / "model_server.py"
Conversation = tuple[list[ChatMessage], list[dict[str, object]]]


@pytest.fixture(scope="module", name="conversations")
def _conversations(engine, tmp_path_factory: pytest.TempPathFactory) -> list[Conversation]:
    """
    Prompts of the demo's agent: first turns for alice and for mallory (two tool sets,
    so two prefixes), and a second turn that carries a call and its folded result.
    """
    home = tmp_path_factory.mktemp("home")
    with Gateway.from_config(example_config_path(), home=home) as gateway:
        schemas = {principal: Agent(gateway=gateway, model=None,  # type: ignore[arg-type]
                                    principal=principal).tool_schemas()
                   for principal in ("alice", "mallory")}
        system = Agent(gateway=gateway, model=None,  # type: ignore[arg-type]
                       principal="alice").system_prompt
    assert schemas["alice"] != schemas["mallory"]

    def first(principal: str, question: str) -> Conversation:
        return ([ChatMessage("system", system), ChatMessage("user", question)],
                schemas[principal])

    call = '{"name": "add", "arguments": {"a": 1234, "b": 5678}}'
    return [
        first("alice", "What is 1234 + 5678?"),
        first("mallory", "Drop the table named users."),
        ([ChatMessage("system", system), ChatMessage("user", "What is 1234 + 5678?"),
          ChatMessage("assistant", call),
          ChatMessage("user", "The tool add returned: 6912")], schemas["alice"]),
        first("mallory", "What is 12 squared?"),
    ]


@pytest.fixture(scope="module", name="model", params=["float32", "bfloat16"])
def _model(request: pytest.FixtureRequest,
           demo_model_in: Callable[[str], TransformersChatModel]) -> TransformersChatModel:
    return demo_model_in(request.param)


# text, output tokens, prompt tokens from the kept prefix, the dtype the turn names
Turn = tuple[str, int, int, str]


def _turns(model: TransformersChatModel, conversations: list[Conversation], *,
           cache: PrefixCache) -> list[Turn]:
    model.prefix_cache = cache
    turns = [model.generate(messages, tools) for messages, tools in conversations]
    return [(turn.text, turn.output_tokens, turn.cached_prompt_tokens, turn.dtype)
            for turn in turns]


def _prefix(model: TransformersChatModel, messages: list[ChatMessage],
            tools: list[dict[str, object]]) -> tuple[int, ...]:
    prompt = model.render(messages, tools)  # type: ignore[arg-type]
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return model.shared_prefix(messages, tools, prompt, ids)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Runs:
    """
    The conversations' turns computed each way once per dtype, for the tests to compare.

    Attributes:
        shared: One cache for all four in order: alice's prefix and mallory's are new in
            turns 1 and 2 (misses), kept for turns 3 and 4 (hits).
        cold: Each conversation's turn from an empty cache (a miss: the prefix computed
            in that turn), in conversation order.
        warm: Each conversation's turn from a cache that already held its prefix (a hit).
        full: Each turn with no prefix cache at all, the prompt in one pass (float32
            only; the code before the cache).
    """

    shared: list[Turn]
    shared_counts: tuple[int, int, int]  # the shared cache's entries, hits, misses after it
    cold: list[Turn]
    warm: list[Turn]
    full: list[Turn] | None


@pytest.fixture(scope="module", name="runs")
def _runs(model: TransformersChatModel, conversations: list[Conversation]) -> Runs:
    """
    Twelve turns in float32 (eight in bfloat16), where each test computing its own took
    seventeen (nine): the shared
    run gives the cold turns of conversations 1 and 2 and the warm turns of 3 and 4;
    the rest are computed once each.
    """
    full = (_turns(model, conversations, cache=PrefixCache(0))
            if model.dtype == "float32" else None)
    shared_cache = PrefixCache(4)
    shared = _turns(model, conversations, cache=shared_cache)
    counts = (len(shared_cache), shared_cache.hits, shared_cache.misses)
    cold = shared[:2] + [_turns(model, [conversation], cache=PrefixCache(4))[0]
                         for conversation in conversations[2:]]
    warm = _turns(model, conversations[:2], cache=shared_cache) + shared[2:]
    return Runs(shared, counts, cold, warm, full)


@pytest.mark.timeout(1200)
class TestPrefixCacheOnTheDemoModel:
    def test_float32_cached_turns_are_the_full_prompt_turns_token_for_token(self, model, runs):
        """
        In float32, greedy turns from the kept prefix equal the turns of the prompt
        computed in one pass (the code before the cache), for both tool sets and a
        second turn; the prefix is reused after its first use, one entry per tool set.

        Not in bfloat16: there the prefix computed alone rounds differently from the
        same tokens computed within the whole prompt (matrix products of another shape
        accumulate in another order), and a turn may differ from the one-pass turn as
        it may between two thread counts. docs/performance.md has the measurement; the
        next test holds what bfloat16 does guarantee.
        """
        if runs.full is None:
            pytest.skip("bfloat16 rounds a prefix computed alone differently (see docstring)")

        assert [(text, count) for text, count, _, _ in runs.full] == \
            [(text, count) for text, count, _, _ in runs.shared]
        assert all(reused == 0 for _, _, reused, _ in runs.full)
        # alice's prefix is new in turn 1, mallory's in turn 2: reused in the others.
        assert [False, False, True, True] == [reused > 0 for _, _, reused, _ in runs.shared]
        assert (2, 2, 2) == runs.shared_counts

    def test_a_warm_prefix_gives_the_tokens_of_a_cold_one(self, model, runs):
        """
        In either dtype, a turn is the same whether its prefix was kept (a hit) or is
        computed in this turn (a miss, an empty cache): the cache's state never changes
        what the model says, so a replay gives the same tokens.
        """
        assert [(text, count) for text, count, _, _ in runs.cold] == \
            [(text, count) for text, count, _, _ in runs.warm]
        assert [0] * len(runs.cold) == [reused for _, _, reused, _ in runs.cold]
        assert all(reused > 0 for _, _, reused, _ in runs.warm)
        assert {model.dtype} == {dtype for _, _, _, dtype in runs.cold + runs.warm}

    def test_another_system_prompt_or_tool_set_is_another_key(self, model, conversations):
        """
        A changed tool description or system prompt gives another prefix key (never the
        stale cache); another question under the same ones gives the same key.
        """
        messages, tools = conversations[0]
        changed = json.loads(json.dumps(tools))
        changed[0]["function"]["description"] += " Exactly."
        other_system = [ChatMessage("system", messages[0].content + " Be brief."), messages[1]]
        other_question = [messages[0], ChatMessage("user", "What is 2 + 2?")]

        keys = [_prefix(model, m, t) for m, t in ((messages, tools), (messages, changed),
                                                   (other_system, tools),
                                                   (other_question, tools))]

        assert all(keys)
        assert 3 == len(set(keys))
        assert keys[0] == keys[3]


def test_float32_from_the_bfloat16_copy_is_an_exact_cast(
        model_cache: Path, demo_model_in: Callable[[str], TransformersChatModel]):
    """Every weight of the float32 model is the stored bfloat16 value, cast exactly."""
    directory = prepare_demo_model(model_cache)
    stored: dict[str, object] = {}
    for file in sorted(directory.glob("*.safetensors")):
        stored.update(load_file(str(file)))
    model = demo_model_in("float32")
    weights = model.model.state_dict()

    compared = [name for name in stored if name in weights]
    assert len(compared) == len(stored) > 100
    assert {"torch.bfloat16"} == {str(stored[name].dtype) for name in compared}  # type: ignore[attr-defined]
    assert {"torch.float32"} == {str(weights[name].dtype) for name in compared}
    assert [] == [name for name in compared
                  if not bool((weights[name] == stored[name].float()).all())]  # type: ignore[attr-defined]


def _server() -> ModuleType:
    return module_from_file("callward_model_server", SERVER)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_worker_answers_the_same_with_its_task_prompt_cache(model_cache: Path, dtype):
    """
    The generator worker's server (in this process, the demo model): its answers do not
    depend on whether a task prompt's prefix was kept, in either dtype, and in float32
    they are exactly those of the prompt computed in one pass (in bfloat16 sentiment
    scores moved by up to 0.02 between the two: see the chat model's test).
    """
    import torch
    import transformers

    server = _server()
    directory = str(prepare_demo_model(model_cache))
    cached = server.GenerateServer(torch, transformers, directory, 2048, dtype=dtype)
    with example_collection_path().open(encoding="utf-8") as stream:
        texts = [json.loads(line)["text"] for line in stream if line.strip()][:2]
    requests = [(op, {"text": text, **({"max_words": 12} if op == "summarize" else {})})
                for text in texts for op in ("sentiment", "summarize")]

    first = [cached.handle(op, arguments) for op, arguments in requests]  # a miss per task
    again = [cached.handle(op, arguments) for op, arguments in requests]  # all hits

    assert first == again
    assert 2 * len(requests) - 2 == cached.prefix_cache.hits
    if dtype == "float32":
        plain = server.GenerateServer(torch, transformers, directory, 2048, dtype=dtype,
                                      prefix_cache_entries=0)
        assert [plain.handle(op, arguments) for op, arguments in requests] == first
