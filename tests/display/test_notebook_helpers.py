"""Memory footprint of a multi-adapter model, part by part (marl_utils.display.notebook_helpers, notebooks 04-05)."""

import os
import warnings

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, make_reward_adapter, make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.display import notebook_helpers
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.display.notebook_helpers import (adapter_cost, dequantized_weight, footprint, footprint_rows, median_seconds,
                                        plot_footprint, plot_runs, storage_bytes)

torch.set_num_threads(1)
HIDDEN, LAYERS, INTERMEDIATE = 64, 2, 128  # hidden 64: bitsandbytes' 4-bit blocks are 64 wide


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("footprint")
    base = make_tiny_llama(root / "base", hidden=HIDDEN, layers=LAYERS, intermediate_size=INTERMEDIATE,
                           tie_word_embeddings=True)
    return str(base), str(make_reward_adapter(base, root / "rm"))


def lora(r=4):
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS["llama"],
                      task_type="CAUSAL_LM")


def load(paths, **kwargs):
    base, rm = paths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora(), reward_adapter=rm, **kwargs)


def body_linears(model):
    """(out, in) of every linear layer in the decoder blocks: the layers bitsandbytes quantizes."""
    decoder = model.pretrained_model.get_base_model().model
    return [(m.out_features, m.in_features) for name, m in decoder.layers.named_modules()
            if type(m).__name__ in ("Linear", "Linear8bitLt", "Linear4bit") and "lora_" not in name
            and not type(m).__module__.startswith("peft")]  # peft's LoRA wrapper is also called Linear


def test_storage_bytes_counts_shared_storage_once():
    a = torch.zeros(10, 4)
    assert storage_bytes([a]) == 160
    assert storage_bytes([a, a[2:5], a.view(40), a.t()]) == 160  # views share one storage
    assert storage_bytes([a, torch.zeros(10, 4)]) == 320
    assert storage_bytes([torch.zeros(3, dtype=torch.int8), torch.zeros(2, dtype=torch.float64)]) == 3 + 16


def test_fp32_parts_match_parameter_shapes(paths):
    model = load(paths)
    parts = footprint(model)
    params = dict(model.named_parameters())
    lora_default = sum(p.numel() for n, p in params.items() if ".lora_" in n and ".default." in n)
    lora_reward = sum(p.numel() for n, p in params.items() if ".lora_" in n and ".reward_adapter." in n)
    assert parts["lora/default"] == 4 * lora_default > 0
    assert parts["lora/reward_adapter"] == 4 * lora_reward > 0
    assert parts["value_head/default"] == 4 * (HIDDEN + 1)
    assert parts["reward_head"] == 4 * sum(p.numel() for p in model.reward_head.parameters())
    assert "base/quantized" not in parts
    # every byte counted once: parameters (tied ones once, as .parameters() yields them) plus buffers
    unique = 4 * sum(p.numel() for p in model.parameters()) + sum(b.numel() * b.element_size()
                                                                  for b in model.buffers())
    assert sum(parts.values()) == unique


def test_tied_embeddings_count_once(paths):
    model = load(paths)
    causal_lm = model.pretrained_model.get_base_model()
    assert causal_lm.lm_head.weight.data_ptr() == causal_lm.model.embed_tokens.weight.data_ptr()
    naive = sum(p.numel() * 4 for _, p in model.named_parameters(remove_duplicate=False))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert sum(footprint(model).values()) == naive - causal_lm.lm_head.weight.numel() * 4 + buffers


def test_8bit_base_holds_int8_weights_plus_row_scales(paths):
    pytest.importorskip("bitsandbytes")
    fp32, q8 = footprint(load(paths)), footprint(load(paths, load_in_8bit=True))
    linears = body_linears(load(paths, load_in_8bit=True))
    assert len(linears) == 7 * LAYERS
    # LLM.int8: one byte per weight plus one float32 scale (SCB) per output row
    assert q8["base/quantized"] == sum(o * i + 4 * o for o, i in linears)
    float_linears = sum(4 * o * i for o, i in linears)
    assert q8["base/float"] == fp32["base/float"] - float_linears  # embeddings and norms stay float32
    for part in ("lora/default", "lora/reward_adapter", "value_head/default", "reward_head"):
        assert q8[part] == fp32[part]  # adapters and heads stay float32


def test_4bit_base_holds_half_bytes_plus_block_scales(paths):
    pytest.importorskip("bitsandbytes")
    model = load(paths, load_in_4bit=True)
    q4 = footprint(model)
    linears = body_linears(model)
    packed = sum(o * i // 2 for o, i in linears)          # two 4-bit codes per byte
    absmax = sum(4 * (o * i // 64) for o, i in linears)    # one float32 absmax per block of 64 weights
    codebook = 4 * 16 * len(linears)                       # at most a 16-entry float32 code table per layer
    assert packed + absmax <= q4["base/quantized"] <= packed + absmax + codebook


def test_adapter_cost_is_what_an_extra_policy_adds(paths):
    model = load(paths)
    before = sum(footprint(model).values())
    model.add_policy_adapter("policy_2", lora())
    after = footprint(model)
    assert adapter_cost(model, "policy_2") == adapter_cost(model, "default") > 0
    assert sum(after.values()) - before == adapter_cost(model, "policy_2")
    model.add_policy_adapter("policy_3", lora(r=8))  # twice the rank: twice the LoRA bytes
    assert after["lora/policy_2"] * 2 == footprint(model)["lora/policy_3"]


def test_footprint_rows_sum_parts(paths):
    model = load(paths)
    parts = footprint(model)
    (row,) = footprint_rows({"fp32": model})
    assert row["model"] == "fp32"
    assert row["total MiB"] == pytest.approx(sum(parts.values()) / 2 ** 20)
    assert row["base float MiB"] + row["base quantized MiB"] + row["adapters + heads MiB"] == \
        pytest.approx(row["total MiB"])
    assert row["adapters + heads MiB"] == pytest.approx(
        sum(v for k, v in parts.items() if not k.startswith("base/")) / 2 ** 20)


def test_median_seconds_takes_the_median(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # durations 5, 1, 3
    monkeypatch.setattr(notebook_helpers.time, "perf_counter", lambda: next(clock))
    calls = []
    assert median_seconds(lambda: calls.append(1), repeats=3) == 3.0
    assert len(calls) == 3


def test_plot_runs_overlays_one_line_per_run(tmp_path):
    histories = {"8-bit": [{"r": 1.0, "kl": 0.0}, {"r": 3.0, "kl": 1.0}, {"r": 5.0}],
                 "4-bit": [{"r": 0.0, "kl": 2.0}, {"r": 2.0, "kl": 4.0}]}
    fig = plot_runs(histories, ["r", "kl"], smooth=2, save_to=tmp_path / "runs.png")
    assert (tmp_path / "runs.png").stat().st_size > 0
    reward_panel, kl_panel = fig.axes
    labelled = {line.get_label(): list(line.get_ydata()) for line in reward_panel.lines
                if not line.get_label().startswith("_")}
    assert labelled == {"8-bit": [1.0, 2.0, 4.0], "4-bit": [0.0, 1.0]}  # smoothed over a window of 2
    assert [list(line.get_ydata()) for line in kl_panel.lines][:2] == [[0.0, 1.0], [0.0, 0.5]]  # raw, smoothed


def test_dequantized_weight_is_what_the_layer_computes_with(paths):
    pytest.importorskip("bitsandbytes")
    from marl_utils.model.quantization import quantized_linear_layers

    fp32 = dict(load(paths).named_modules())
    errors = {}
    for bits in ("8bit", "4bit"):
        model = load(paths, **{f"load_in_{bits}": True})
        names = {id(m): n for n, m in model.named_modules()}
        layers = quantized_linear_layers(model)
        assert len(layers) == 7 * LAYERS
        rel = []
        for layer in layers:
            original = fp32[names[id(layer)]].weight
            assert torch.equal(dequantized_weight(fp32[names[id(layer)]]), original)  # a float layer as is
            deq = dequantized_weight(layer)
            assert deq.shape == original.shape and deq.dtype == torch.float32
            rel.append(((deq - original).norm() / original.norm()).item())
        errors[bits] = max(rel)
        if bits == "4bit":  # bitsandbytes' 4-bit matmul multiplies by exactly this weight
            x = torch.randn(3, layers[0].in_features)
            with torch.no_grad():
                torch.testing.assert_close(layers[0](x), x @ dequantized_weight(layers[0]).t(), atol=1e-5, rtol=1e-4)
    assert errors["8bit"] < 0.01 and errors["4bit"] < 0.3 and errors["8bit"] < errors["4bit"] / 5, errors


def test_plot_footprint_stacks_the_parts(paths, tmp_path):
    rows = footprint_rows({"fp32": load(paths)})
    fig = plot_footprint(rows, save_to=tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    heights = [patch.get_height() for patch in fig.axes[0].patches]
    assert heights == pytest.approx([rows[0]["base quantized MiB"], rows[0]["base float MiB"],
                                     rows[0]["adapters + heads MiB"]])


def test_token_count_panels_start_at_zero():
    from marl_utils.display.plots import plot_curves

    history = [{"ppo/response_tokens_mean": 19.6, "r": 1.0}, {"ppo/response_tokens_mean": 20.0, "r": 2.0}]
    for fig in (plot_curves(history, ["r", "ppo/response_tokens_mean"]),
                plot_runs({"a": history}, ["r", "ppo/response_tokens_mean"])):
        reward_panel, length_panel = fig.axes
        assert length_panel.get_ylim()[0] == 0 and length_panel.get_ylim()[1] >= 20.0
        assert reward_panel.get_ylim()[0] > 0  # other metrics keep matplotlib's fitted range


def test_dequantized_weight_comes_back_on_the_cpu():
    from types import SimpleNamespace

    from foreign_device import on_other_device

    weight = torch.randn(3, 4)
    layer = SimpleNamespace(weight=on_other_device(weight.clone()))  # a float layer whose weight lives "elsewhere"
    deq = dequantized_weight(layer)
    assert torch.equal(deq - weight, torch.zeros(3, 4))  # mixing it with a CPU tensor works: it came back
    assert deq.dtype == torch.float32 and deq.device.type == "cpu"


def test_fastest_threads_keeps_the_quicker_count(monkeypatch):
    from marl_utils.display.notebook_helpers import fastest_threads

    before = torch.get_num_threads()
    clock = [0.0]
    monkeypatch.setattr(notebook_helpers.time, "perf_counter", lambda: clock[0])

    def step():  # pretend two threads take 3 ms and one thread 5 ms
        clock[0] += 0.003 if torch.get_num_threads() == 2 else 0.005

    try:
        best, medians = fastest_threads(step, [1, 2])
        assert best == 2 and medians == pytest.approx({1: 0.005, 2: 0.003})
    finally:
        torch.set_num_threads(before)


def test_set_cpu_threads_leaves_big_and_gpu_models_alone():
    from marl_utils.display.notebook_helpers import set_cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert set_cpu_threads(torch.nn.Linear(8, 8), max_parameters=72) == 2  # 72 parameters: not small
        assert set_cpu_threads(torch.nn.Linear(8, 8, device="meta"), max_parameters=1_000) == 2  # not on the CPU
    finally:
        torch.set_num_threads(before)


def test_set_cpu_threads_times_a_small_model_without_side_effects(paths, tmp_path):
    from marl_utils.display.notebook_helpers import set_cpu_threads

    base, _ = paths  # a reward adapter with LoRA on the input embeddings too, as stage 2 trains it for tiny
    model = load((base, str(make_reward_adapter(base, tmp_path / "rm", target_modules=LORA_TARGETS["llama"]
                                                + ["embed_tokens"]))))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rng = torch.get_rng_state()
        chosen = set_cpu_threads(model, verbose=True)
        assert chosen in (1, 2) and torch.get_num_threads() == chosen
        assert torch.equal(torch.get_rng_state(), rng)  # the notebook's random numbers are not shifted
        assert all(p.grad is None for p in model.parameters())
    finally:
        torch.set_num_threads(before)


def test_rounded_prints_short_numbers():
    from marl_utils.display.notebook_helpers import rounded

    values = torch.tensor([0.96, -1.23456], dtype=torch.float32)
    assert values.round(decimals=2).tolist()[0] != 0.96  # the float32 noise this helper exists for
    assert rounded(values) == [0.96, -1.23] and repr(rounded(values)) == "[0.96, -1.23]"
    assert rounded([1 / 3, 2], 3) == [0.333, 2.0]
    assert repr(rounded(torch.tensor([-0.0, -0.001]))) == "[0.0, 0.0]"  # no "-0.0" for a zero reward


def test_readable_marks_broken_characters():
    from marl_utils.display.notebook_helpers import readable

    cut = b"caf\xc3".decode("utf-8", errors="replace")  # a response stopped inside a two-byte character
    assert readable(cut + " ok") == "caf? ok" and readable("plain") == "plain"


def test_exercise_dir_is_a_fresh_folder_inside_the_run(tmp_path):
    from marl_utils.display.notebook_helpers import exercise_dir, parameter_share

    folder = exercise_dir(tmp_path / "tiny", "01-40-steps")
    assert folder == tmp_path / "tiny" / "exercises" / "01-40-steps" and not folder.exists()
    assert parameter_share(36865, 259840) == "14.2% (36,865 of 259,840)"
