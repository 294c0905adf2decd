"""The dtype choice from the CPU's flags, the flags read from /proc/cpuinfo, and the threads."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from callward.core.models._cpu import (
    NATIVE_BF16_FLAGS,
    DtypeChoice,
    choose_dtype,
    cpu_flags,
    cpu_model_name,
    prompts_in_float32,
    store_for_decoding,
    usable_cpus,
)
from tests._modules import module_from_file

SERVER = Path(__file__).resolve().parents[3] / "sandbox" / "image" / "model_server.py"

# The reporter: a 2-core AMD EPYC with AVX2 and no AVX-512 (Zen 2/3).
AVX2_ONLY = frozenset(["fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "f16c", "fma",
                       "avx2", "bmi2"])
# This project's machine: AMD EPYC family 25 model 17 (Zen 4), AVX512_BF16, no AMX.
ZEN4 = AVX2_ONLY | frozenset(["avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"])
# Intel Sapphire Rapids: AMX (and AVX512_BF16).
SAPPHIRE_RAPIDS = AVX2_ONLY | frozenset(["avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                                         "amx_int8"])
AMX_ONLY = AVX2_ONLY | frozenset({"amx_bf16", "amx_tile"})


class TestChooseDtype:
    def test_an_avx2_cpu_without_bfloat16_arithmetic_gets_bfloat16_weights_float32_prompts(
            self):
        """
        AVX2 alone (and AVX-512 without BF16) chooses bfloat16 weights with prompts in
        float32, naming the flag it rests on and the one missing; describe() says so.
        """
        choice = choose_dtype(AVX2_ONLY)
        avx512_only = choose_dtype(AVX2_ONLY | {"avx512f", "avx512bw"})

        assert DtypeChoice("bfloat16", "cpu flag avx2, no avx512_bf16 or amx_bf16 cpu flag: "
                           "bfloat16 weights", prompts_in_float32=True) == choice == avx512_only
        assert choice.describe().endswith("bfloat16 weights, prompts computed in float32)")

    def test_without_room_for_the_float32_copies_it_is_float32(self):
        """A caller that cannot afford the copies (a worker) gets float32 on that CPU."""
        choice = choose_dtype(AVX2_ONLY, float32_copies_allowed=False)

        assert DtypeChoice("float32", "no avx512_bf16 or amx_bf16 cpu flag: bfloat16 would "
                           "be emulated") == choice
        assert choice == choose_dtype(AVX2_ONLY, "auto", float32_copies_allowed=False)
        # Native bfloat16 takes no copies, and a setting is a setting.
        assert choose_dtype(ZEN4) == choose_dtype(ZEN4, float32_copies_allowed=False)
        assert choose_dtype(AVX2_ONLY, "bfloat16").prompts_in_float32
        assert choose_dtype(AVX2_ONLY, "bfloat16", float32_copies_allowed=False) == \
            choose_dtype(AVX2_ONLY, "bfloat16")

    @pytest.mark.parametrize("flags", [frozenset(), frozenset({"sse2", "avx", "fma"}),
                                       frozenset({"fp", "asimd", "bf16"})])
    def test_a_cpu_without_avx2_or_unknown_computes_in_float32(self, flags):
        """No flags, an x86 CPU without AVX2, or another architecture: float32."""
        choice = choose_dtype(flags)

        assert ("float32", False) == (choice.dtype, choice.prompts_in_float32)
        assert "no avx512_bf16 or amx_bf16 cpu flag" in choice.reason

    @pytest.mark.parametrize(("flags", "flag"), [(ZEN4, "avx512_bf16"),
                                                 (SAPPHIRE_RAPIDS, "avx512_bf16"),
                                                 (AMX_ONLY, "amx_bf16")])
    def test_native_bfloat16_chooses_bfloat16_and_names_the_flag(self, flags, flag):
        """avx512_bf16 or amx_bf16 chooses bfloat16; the reason names the flag."""
        assert DtypeChoice("bfloat16", f"cpu flag {flag}: native bfloat16") == \
            choose_dtype(flags)

    @pytest.mark.parametrize("flags", [AVX2_ONLY, ZEN4, frozenset()])
    @pytest.mark.parametrize("requested", ["float32", "bfloat16"])
    def test_a_configured_dtype_is_honoured_on_any_cpu(self, flags, requested):
        """An explicit dtype wins over the flags, and says it was configured."""
        choice = choose_dtype(flags, requested)

        assert (requested, "set in the configuration") == (choice.dtype, choice.reason)

    @pytest.mark.parametrize(("flags", "requested", "expected"), [
        (AVX2_ONLY, "bfloat16", True), (frozenset(), "bfloat16", True),
        (ZEN4, "bfloat16", False), (AMX_ONLY, "bfloat16", False),
        (AVX2_ONLY, "float32", False), (AVX2_ONLY, "auto", True), (ZEN4, "auto", False),
        (frozenset(), "auto", False)])
    def test_bfloat16_without_its_arithmetic_computes_prompts_in_float32(
            self, flags, requested, expected):
        """Only bfloat16 on a CPU without bfloat16 arithmetic; describe() says so."""
        choice = choose_dtype(flags, requested)

        assert expected == choice.prompts_in_float32
        assert expected == ("prompts computed in float32" in choice.describe())

    def test_no_flags_read_is_float32(self):
        """Unreadable flags (another OS, a restricted sandbox) fail safe to float32."""
        assert "float32" == choose_dtype(frozenset()).dtype

    @pytest.mark.parametrize("requested", ["fp16", "float16", "", "AUTO"])
    def test_another_dtype_is_refused(self, requested):
        """Only auto, float32 and bfloat16 exist."""
        with pytest.raises(ValueError, match="dtype must be one of"):
            choose_dtype(ZEN4, requested)

    @pytest.mark.parametrize("copies", [True, False])
    @pytest.mark.parametrize("flags", [AVX2_ONLY, ZEN4, SAPPHIRE_RAPIDS, AMX_ONLY, frozenset()])
    @pytest.mark.parametrize("requested", ["auto", "float32", "bfloat16"])
    def test_the_worker_server_chooses_as_core_does(self, flags, requested, copies):
        """model_server.py, which cannot import callward, repeats the same rule."""
        server = _server()
        core = choose_dtype(flags, requested, float32_copies_allowed=copies)

        assert (core.dtype, core.reason, core.prompts_in_float32) == server.choose_dtype(
            flags, requested, float32_copies_allowed=copies)
        assert NATIVE_BF16_FLAGS == server.NATIVE_BF16_FLAGS

    @pytest.mark.parametrize("flags", [AVX2_ONLY, ZEN4, AMX_ONLY, frozenset()])
    @pytest.mark.parametrize("requested", ["auto", "float32", "bfloat16"])
    def test_the_generator_worker_takes_no_float32_copies_under_auto(self, flags, requested):
        """Its memory limit is sized for float32: auto on AVX2 alone is float32 there."""
        core = choose_dtype(flags, requested, float32_copies_allowed=False)

        assert (core.dtype, core.reason, core.prompts_in_float32) == \
            _server().generator_dtype(flags, requested)
        assert ("float32", False) == _server().generator_dtype(AVX2_ONLY, "auto")[::2]


def _layers(torch, dtype):
    """A model's kinds of linear layer: square, narrowing, widening (with and without bias)."""
    torch.manual_seed(7)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.Linear(16, 4, bias=False),
        torch.nn.Linear(4, 64, bias=False), torch.nn.Linear(64, 8),
    ).to(dtype)


class TestStoreForDecoding:
    def test_widening_float32_weights_are_stored_input_major_with_the_same_numbers(self):
        """Only the 4->64 layer widens; its values stay, its memory order flips."""
        torch = pytest.importorskip("torch")
        model = _layers(torch, torch.float32)
        before = [layer.weight.detach().clone() for layer in model]
        rows = torch.randn(5, 16)
        with torch.inference_mode():
            expected = model(rows)

        changed = store_for_decoding(torch, model, "float32")

        assert 1 == changed
        assert [(16, 1), (16, 1), (1, 64), (64, 1)] == [layer.weight.stride() for layer in model]
        assert all(torch.equal(old, layer.weight) for old, layer in zip(before, model, strict=True))
        with torch.inference_mode():
            assert torch.allclose(expected, model(rows), rtol=0, atol=1e-5)

    def test_it_is_done_once(self):
        """A second pass finds nothing left to change."""
        torch = pytest.importorskip("torch")
        model = _layers(torch, torch.float32)
        store_for_decoding(torch, model, "float32")

        assert 0 == store_for_decoding(torch, model, "float32")

    def test_bfloat16_weights_are_left_as_they_are(self):
        """In bfloat16 the output-major product is the faster one: nothing moves."""
        torch = pytest.importorskip("torch")
        model = _layers(torch, torch.bfloat16)

        assert 0 == store_for_decoding(torch, model, "bfloat16")
        assert all(layer.weight.is_contiguous() for layer in model)

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_the_worker_server_stores_as_core_does(self, dtype):
        """model_server.py repeats the rule: the same layers change, the same way."""
        torch = pytest.importorskip("torch")
        ours, theirs = _layers(torch, getattr(torch, dtype)), _layers(torch, getattr(torch, dtype))

        assert store_for_decoding(torch, ours, dtype) == _server().store_for_decoding(
            torch, theirs, dtype)
        assert ([layer.weight.stride() for layer in ours]
                == [layer.weight.stride() for layer in theirs])


class TestPromptsInFloat32:
    def test_several_rows_are_a_float32_product_and_one_row_a_bfloat16_product(self):
        """
        Several rows: the float32 product of the exact float32 weights, rounded once to
        bfloat16. One row: the bfloat16 product. The weights and state dict stay.
        """
        torch = pytest.importorskip("torch")
        model = _layers(torch, torch.bfloat16)
        state = {name: value.clone() for name, value in model.state_dict().items()}
        rows = torch.randn(5, 16).bfloat16()
        expected_rows, expected_row = rows, rows[:1]
        for layer in model:
            bias = None if layer.bias is None else layer.bias.float()
            expected_rows = torch.nn.functional.linear(
                expected_rows.float(), layer.weight.float(), bias).bfloat16()
            expected_row = torch.nn.functional.linear(expected_row, layer.weight, layer.bias)

        assert 4 == prompts_in_float32(torch, model)
        with torch.inference_mode():
            several, one = model(rows), model(rows[:1])

        assert (torch.bfloat16, torch.bfloat16) == (several.dtype, one.dtype)
        assert bool((expected_rows == several).all())
        assert bool((expected_row == one).all())
        assert state.keys() == model.state_dict().keys()
        assert all(bool((state[name] == value).all())
                   for name, value in model.state_dict().items())

    def test_a_second_pass_and_float32_layers_change_nothing(self):
        """Idempotent; float32 layers are not bfloat16 products to begin with."""
        torch = pytest.importorskip("torch")
        bf16, f32 = _layers(torch, torch.bfloat16), _layers(torch, torch.float32)
        prompts_in_float32(torch, bf16)

        assert (0, 0) == (prompts_in_float32(torch, bf16), prompts_in_float32(torch, f32))
        assert all("forward" not in layer.__dict__ for layer in f32)

    def test_the_float32_copy_is_made_for_several_rows_only(self):
        """A layer that only ever multiplies one row (a head fed the last row) gets none."""
        torch = pytest.importorskip("torch")
        model = _layers(torch, torch.bfloat16)
        prompts_in_float32(torch, model)
        with torch.inference_mode():
            model(torch.randn(1, 16).bfloat16())
        assert all(layer.forward._weight is None for layer in model)

        with torch.inference_mode():
            model(torch.randn(3, 16).bfloat16())
        copies = [layer.forward._weight for layer in model]
        assert all(copy.dtype == torch.float32 and not copy.is_inference() for copy in copies)

    def test_the_worker_server_computes_as_core_does(self):
        """model_server.py repeats prompts_in_float32: the same layers, the same numbers."""
        torch = pytest.importorskip("torch")
        ours, theirs = _layers(torch, torch.bfloat16), _layers(torch, torch.bfloat16)
        rows = torch.randn(6, 16).bfloat16()

        assert prompts_in_float32(torch, ours) == _server().prompts_in_float32(torch, theirs)
        with torch.inference_mode():
            assert bool((ours(rows) == theirs(rows)).all())
            assert bool((ours(rows[:1]) == theirs(rows[:1])).all())


class TestLastLogitsOnly:
    def test_the_worker_server_asks_as_core_does(self):
        """model_server.py repeats last_logits_only: the same argument for either forward."""
        torch = pytest.importorskip("torch")
        from callward.core.models._chat import last_logits_only

        class _Keeps(torch.nn.Module):
            def forward(self, input_ids, logits_to_keep=0):
                return input_ids, logits_to_keep

        for model, expected in ((_Keeps(), {"logits_to_keep": 1}), (torch.nn.Linear(2, 2), {})):
            assert expected == last_logits_only(model) == _server()._last_logits_only(model)


class TestCpuInfo:
    def test_flags_and_model_name_are_read_from_the_first_processor(self, tmp_path):
        """The first processor's flags line and model name."""
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(
            "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512_bf16\n", encoding="utf-8")

        assert frozenset({"fpu", "avx2", "fma"}) == cpu_flags(cpuinfo)
        assert "AMD EPYC 7B13" == cpu_model_name(cpuinfo)

    def test_an_unreadable_cpuinfo_gives_no_flags(self, tmp_path):
        """No file, no flags: the choice is then float32."""
        assert (frozenset(), "unknown") == (cpu_flags(tmp_path / "absent"),
                                            cpu_model_name(tmp_path / "absent"))

    def test_this_machines_flags_are_read(self):
        """On Linux the real /proc/cpuinfo gives flags (x86: at least sse2)."""
        if not Path("/proc/cpuinfo").is_file():
            pytest.skip("no /proc/cpuinfo")
        assert cpu_flags()

    def test_every_cpu_of_the_affinity_mask_is_used(self):
        """usable_cpus counts the CPUs this process may run on."""
        assert len(os.sched_getaffinity(0)) == usable_cpus()


def _server() -> ModuleType:
    return module_from_file("callward_model_server", SERVER)
