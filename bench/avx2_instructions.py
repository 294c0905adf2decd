"""
The demo model's work on a CPU with AVX2 and no AVX-512, counted in instructions.

No such CPU is at hand, but valgrind's is one: it reports AVX2 and no AVX-512 to the
program it runs, so ``torch`` (whose kernels are chosen by what the CPU reports) takes
the code paths of an AVX2-only CPU, here. valgrind counts the instructions each path
executes (callgrind), the same count on every run, whatever the machine is doing; it
cannot tell the time such a CPU would take, which also depends on its memory.

Cases, each counted in float32 and in bfloat16 in one valgrind run per case:

- ``decoding step``: the demo model's forward for one token after 600 cached positions
  (the cache's keys and values are random: their values do not change the work); in
  bfloat16 with the float32 prompt copies ``auto`` chooses on such a CPU, which a
  one-row product does not use;
- ``32-row product``: a linear layer's product of 32 rows (a prompt's), 896 to 4864 wide,
  as every layer of a bfloat16 model computed it before ``prompts_in_float32``;
- ``32-row attention``: ``scaled_dot_product_attention`` of 32 queries over 632 keys
  (14 heads of 64), which ``prompts_in_float32`` leaves in bfloat16.

Printed: instructions per case and dtype, the ratio to float32, and the function that
executed most of them.

Run: .venv/bin/python -m bench.avx2_instructions [--home DIR] (needs valgrind and gcc;
about five minutes on 2 cores, most of it loading torch and the model under valgrind).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import print_table

# Client requests around a counted region: the program runs uncounted outside it.
_REGION_C = r"""
#include <valgrind/callgrind.h>
void region_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void region_stop(const char *name) {
    CALLGRIND_DUMP_STATS_AT(name); CALLGRIND_STOP_INSTRUMENTATION;
}
"""
CASES = ("decoding step", "32-row product", "32-row attention")
DTYPES = ("float32", "bfloat16")
# What the models are given as this CPU's flags in the child: an AVX2 CPU's.
AVX2_FLAGS = frozenset({"fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2",
                        "fma", "f16c"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", help="CALLWARD_HOME whose models/ cache to use "
                        "(default: ~/.callward)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--region-library", help=argparse.SUPPRESS)
    args = parser.parse_args()
    home = Path(args.home).expanduser() if args.home else Path.home() / ".callward"
    if args.child:
        _child(args.child, home / "models", Path(args.region_library))
        return
    for tool in ("valgrind", "gcc", "callgrind_annotate"):
        if shutil.which(tool) is None:
            sys.exit(f"avx2_instructions: {tool} is not installed (apt-get install valgrind gcc)")
    with tempfile.TemporaryDirectory() as scratch:
        _run(home, Path(scratch))


def _run(home: Path, scratch: Path) -> None:
    source = scratch / "region.c"
    source.write_text(_REGION_C, encoding="utf-8")
    library = scratch / "libregion.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)],
                   check=True)
    rows = []
    for number, case in enumerate(CASES):
        out = scratch / f"case{number}"
        out.mkdir()
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", "-q",
             f"--callgrind-out-file={out}/callgrind.out", sys.executable, "-m",
             "bench.avx2_instructions", "--home", str(home), "--child", case,
             "--region-library", str(library)],
            capture_output=True, text=True, check=False,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if done.returncode != 0:
            sys.exit(f"avx2_instructions: {case} failed under valgrind:\n{done.stderr[-2000:]}")
        print(done.stdout.strip(), flush=True)
        counts = {dtype: _count(out, f"{case}|{dtype}") for dtype in DTYPES}
        base = counts["float32"][0]
        for dtype in DTYPES:
            instructions, top = counts[dtype]
            rows.append((case, dtype, f"{instructions / 1e6:.1f}", f"{instructions / base:.2f}x",
                         top))
    print_table("Instructions under valgrind (AVX2, no AVX-512), one thread",
                ["case", "dtype", "instructions (M)", "vs float32", "most of them in"], rows)


def _count(out: Path, name: str) -> tuple[int, str]:
    """The instructions of the dump named ``name``, and the function with most of them."""
    for dump in sorted(out.glob("callgrind.out*")):
        text = dump.read_text(encoding="utf-8", errors="replace")
        if f"Client Request: {name}\n" not in text:
            continue
        total = int(re.search(r"^summary: (\d+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
        annotated = subprocess.run(["callgrind_annotate", str(dump)], capture_output=True,
                                   text=True, check=True).stdout
        functions = annotated.split("file:function", 1)[1]
        top = re.search(r"\(\s*[\d.]+%\)\s+\S*?:(.+?) \[", functions)
        return total, (top.group(1).split("(")[0] if top else "?")
    raise SystemExit(f"avx2_instructions: no dump named {name!r} in {out}")


def _child(case: str, models: Path, library: Path) -> None:
    region = ctypes.CDLL(str(library))
    import torch  # noqa: PLC0415 - under valgrind only

    print(f"{case}: torch {torch.__version__} sees capability "
          f"{torch.backends.cpu.get_cpu_capability()} under valgrind")
    functional = torch.nn.functional
    generator = torch.Generator().manual_seed(0)
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        if case == "decoding step":
            step = _decoding_step(torch, models, dtype_name, generator)
        elif case == "32-row product":
            rows = torch.randn(32, 896, generator=generator).to(dtype)
            weight = torch.randn(4864, 896, generator=generator).to(dtype)

            def step() -> object:
                return functional.linear(rows, weight)  # noqa: B023 - called in this pass
        else:
            query = torch.randn(1, 14, 32, 64, generator=generator).to(dtype)
            keys = torch.randn(1, 14, 632, 64, generator=generator).to(dtype)
            values = torch.randn(1, 14, 632, 64, generator=generator).to(dtype)
            mask = torch.ones(32, 632, dtype=torch.bool).tril(diagonal=600)[None, None]

            def step() -> object:
                return functional.scaled_dot_product_attention(
                    query, keys, values, attn_mask=mask)  # noqa: B023
        with torch.inference_mode():
            step()  # once uncounted: first-use allocations
            region.region_start()
            step()
            region.region_stop(f"{case}|{dtype_name}".encode())


def _decoding_step(torch, models: Path, dtype: str, generator):  # type: ignore[no-untyped-def]
    from transformers import DynamicCache  # noqa: PLC0415

    from callward.core.models._gguf import load_demo_model  # noqa: PLC0415

    chat = load_demo_model(models, dtype=dtype, flags=AVX2_FLAGS, prefix_cache_entries=0)
    torch.set_num_threads(1)
    model = chat.model
    config = model.config
    head = config.hidden_size // config.num_attention_heads
    caches = []
    for _ in range(2):  # one per pass: a step adds a position to its cache
        cache = DynamicCache(config=config)
        for layer in range(config.num_hidden_layers):
            shape = (1, config.num_key_value_heads, 600, head)
            cache.update(torch.randn(*shape, generator=generator).to(model.dtype),
                         torch.randn(*shape, generator=generator).to(model.dtype), layer)
        caches.append(cache)
    token = torch.tensor([[4340]])

    def step() -> object:
        return model(input_ids=token, past_key_values=caches.pop(), use_cache=True)

    return step


if __name__ == "__main__":
    main()
