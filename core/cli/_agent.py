"""``callward agent "question"``: the agent loop with the configured (or demo) model."""

from __future__ import annotations

import argparse
from pathlib import Path

from callward.core.cli._common import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    Subcommands,
    config_options,
    config_path,
    print_json,
    skip_probes,
    subcommand_options,
)
from callward.core.gateway._config import Home, ModelSettings, load_config

DEFAULT_NEW_TOKENS = 256


def _agent(args: argparse.Namespace, home: Home) -> int:
    # The CLI edge loads the model and wires the gateway; nothing heavy loads before.
    from callward.core.agent._loop import Agent, AgentLimits  # noqa: PLC0415
    from callward.core.gateway import Gateway  # noqa: PLC0415
    from callward.core.models._chat import (  # noqa: PLC0415
        ChatModel,
        GenerationConfig,
        TransformersChatModel,
    )
    from callward.core.models._endpoint import (  # noqa: PLC0415
        DEFAULT_TIMEOUT_SECONDS,
        EndpointChatModel,
    )
    from callward.core.models._gguf import load_demo_model  # noqa: PLC0415

    path = config_path(args, home)
    settings = load_config(path).model or ModelSettings()
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens or settings.max_new_tokens or DEFAULT_NEW_TOKENS)
    directory = Path(args.model_dir) if args.model_dir else settings.directory
    model: ChatModel
    if directory is None and settings.endpoint is not None and settings.name is not None:
        model = EndpointChatModel(
            settings.endpoint, settings.name, api_key_env=settings.api_key_env,
            timeout_seconds=settings.timeout_seconds or DEFAULT_TIMEOUT_SECONDS,
            generation=generation, tool_role=args.tool_role or settings.tool_role or "tool")
    elif directory is not None:
        model = TransformersChatModel.from_directory(
            directory, generation=generation,
            tool_role=args.tool_role or settings.tool_role or "tool", dtype=settings.dtype)
    else:
        model = load_demo_model(home.root / "models", generation=generation,
                                tool_role=args.tool_role or settings.tool_role or "user",
                                dtype=settings.dtype)
    limits = AgentLimits(max_steps=args.max_steps, wall_seconds=args.wall_seconds)
    with Gateway.from_config(path, home=home.root,
                             unsafe_skip_probes=skip_probes(args)) as gateway:
        run = Agent(gateway=gateway, model=model, principal=args.principal,
                    session_id=args.session, limits=limits).run(args.question)
    print_json({
        "run_id": run.run_id,
        "question": run.question,
        "answer": run.answer,
        "stop": run.stop,
        "seconds": round(run.seconds, 3),
        "model": {"id": model.model_id, "digest": model.digest,
                  **({"endpoint": model.endpoint} if isinstance(model, EndpointChatModel)
                     else {})},
        "steps": [
            {
                "turn": step.number,
                "output": step.turn.text,
                "tokens": {"prompt": step.turn.prompt_tokens,
                           "output": step.turn.output_tokens},
                "seconds": round(step.turn.duration_seconds, 3),
                "model_turn_seq": step.turn_seq,
                "results": [dict(result.to_json(), repeat=repeat)
                            for result, repeat in zip(step.results, step.repeats, strict=True)],
            }
            for step in run.steps
        ],
    })
    return EXIT_OK if run.stop == "answered" else EXIT_CHECK_FAILED


def add_commands(commands: Subcommands) -> None:
    """Add ``agent QUESTION``."""
    agent = commands.add_parser(
        "agent", parents=[subcommand_options(), config_options()],
        help="answer QUESTION with the model, every call through the gateway")
    agent.add_argument("question", metavar="QUESTION")
    agent.add_argument("--principal", default="alice", help="who is asking (default alice)")
    agent.add_argument("--session", default="")
    agent.add_argument("--model-dir", help="a transformers model directory (safetensors); "
                       "default: the configuration's model.directory, else its "
                       "model.endpoint (a served model), else the demo model, verified by "
                       "digest")
    agent.add_argument("--tool-role", choices=["tool", "user"],
                       help="how results go back: the template's tool role, or folded into a "
                       "user turn (default: user for the demo model, tool otherwise)")
    agent.add_argument("--max-steps", type=int, default=6)
    agent.add_argument("--wall-seconds", type=float, default=300.0)
    agent.add_argument("--max-new-tokens", type=int,
                       help=f"generation budget per turn (default: the configuration's, "
                       f"else {DEFAULT_NEW_TOKENS})")
    agent.set_defaults(handler=_agent)
