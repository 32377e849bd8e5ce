"""benchmark.py: a smoke run on tiny models (every JSON field, finite positive ratios) — no timing assertions."""
import copy
import json
import math

import torch

import benchmark
from lora_linear import count_parameters

RATIOS = ["step_time_ratio_ours_vs_peft", "peak_memory_ratio_ours_vs_peft", "step_time_ratio_ours_vs_floor",
          "step_time_ratio_full_ft_vs_ours", "peak_memory_ratio_full_ft_vs_ours", "merged_inference_ratio_vs_base",
          "unmerged_inference_ratio_vs_base"]
SETTINGS = ["model", "device", "dtype", "batch_size", "seq_len", "rank", "alpha", "targets", "torch", "repeats",
            "cpu_threads", "floor", "memory"]


def test_tiny_gpt2_run_writes_every_field(tmp_path, capsys):
    out = tmp_path / "results" / "benchmark.json"
    benchmark.main(["--tiny", "--model", "gpt2", "--output", str(out)])  # 含每個做法一個量記憶體的子行程
    (run,) = json.loads(out.read_text())["runs"]
    for key in RATIOS + ["step_time_ratio_ours_qv_vs_floor", "peak_memory_ratio_ours_qv_vs_peft"]:
        value = run["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    assert all(key in run["settings"] for key in SETTINGS)
    assert run["settings"]["model"] == "gpt2" and run["settings"]["targets"] == ["c_attn"]
    variants = {"ours", "peft", "ours_qv", "full_ft", "floor"}
    for key in ("step_time_s", "peak_memory_mib", "model_memory_mib", "trainable_parameters"):
        assert set(run[key]) == variants, key
    assert all(t > 0 for t in run["step_time_s"].values())
    assert all(m > 0 for m in run["peak_memory_mib"].values())
    assert set(run["inference_s"]) == {"base", "ours_unmerged", "ours_merged"}
    assert all(len(s) == run["settings"]["repeats"] for s in run["samples_s"]["step"].values())
    # 同一個函數類別：ours 與 peft 的可訓練參數一樣多；q/v 切片在 GPT-2 上也剛好一樣多；地板沒有
    params = run["trainable_parameters"]
    assert params["ours"] == params["peft"] == params["ours_qv"] > 0 and params["floor"] == 0
    table = capsys.readouterr().out
    assert "| ours (c_attn) |" in table and "| frozen floor |" in table and "merged_inference_ratio_vs_base" in table


def test_tiny_smollm2_variants_train_and_match_peft():
    args = benchmark.parse_args(["--tiny", "--model", "smollm2"])
    base = benchmark.build_model("smollm2", tiny=True)
    batch = benchmark.make_batch(base, args)
    trainable = {}
    for variant in benchmark.train_variants("smollm2"):
        model = benchmark.make_variant(variant, copy.deepcopy(base), "smollm2", args)
        trainable[variant] = count_parameters(model)[0]
        benchmark.make_train_step(model, batch, args, floor=variant == "floor")()  # 每個做法都真的能訓練一步
    assert trainable["ours"] == trainable["peft"] > 0
    assert trainable["floor"] == 0 and trainable["full_ft"] == count_parameters(base)[1]


def test_full_size_stand_ins_have_the_real_parameter_counts():
    with torch.device("meta"):  # meta：只有形狀，不配置記憶體，瞬間建好
        gpt2, smollm2 = benchmark.build_model("gpt2"), benchmark.build_model("smollm2")
    assert count_parameters(gpt2)[1] == 124_439_808  # GPT-2 124M
    assert count_parameters(smollm2)[1] == 134_515_008  # SmolLM2-135M（共用 embedding 只算一次）
