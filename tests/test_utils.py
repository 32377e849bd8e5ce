"""utils.py sub-commands: the course's experiment loops, compare / compare_ranks, inspect, generate, errors.

The training runs here are real (train_lora_basic.main in-process) but tiny: a 2-layer GPT-2 on a small local
.txt file, 3 optimizer steps each, so the whole module takes seconds.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

import compare
import models
import train_lora_basic
import utils
from lora_linear import count_parameters, inject_lora, lora_layers, save_adapter
from tiny import CORPUS, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--dataset", "data.txt", "--max_steps", "3", "--max_length", "32", "--batch_size", "4",
            "--eval_steps", "3", "--sample_max_new_tokens", "2"]


@pytest.fixture(scope="module")
def course_runs(tmp_path_factory, tiny_gpt2_dir):
    """A working directory after the course's loops (shortened to two values each), run exactly as written:

        for rank in 2 4; do python train_lora_basic.py --rank $rank --output rank_${rank}; done
        for alpha in 4 8; do python train_lora_basic.py --rank 8 --alpha $alpha; done
    """
    cwd = tmp_path_factory.mktemp("course")
    (cwd / "data.txt").write_text("\n\n".join(CORPUS * 3))
    tiny = ["--model", tiny_gpt2_dir, *TINY_RUN]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        for rank in (2, 4):
            train_lora_basic.main([*tiny, "--rank", str(rank), "--output", f"rank_{rank}",
                                   "--results_dir", "results", "--logdir", "logs"])
        for alpha in (4, 8):  # 沒有 --output：兩次都寫 output/，第一次的要被改名保留下來
            train_lora_basic.main([*tiny, "--rank", "8", "--alpha", str(alpha)])
    return cwd


def run_utils(*args, cwd=None):
    """python utils.py ... as a subprocess -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(ROOT / "utils.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def table_rows(text, values):
    """{value: the table line that starts with it} for the lines of the comparison table."""
    rows = {}
    for line in text.splitlines():
        for v in values:
            if re.match(rf"^\s*{re.escape(v)}\s+[\d,]+\s+[\d.]+%", line):
                rows[v] = line
    return rows


# ----------------------------------------------------------------------------------------------- the loops
def test_alpha_loop_keeps_both_records_and_the_first_adapter(course_runs):
    # 兩次 run 可能在同一秒結束（<時間>_output.json、<時間>_output-1.json）：load_records 依時間排序
    records = [r for r in compare.load_records(course_runs / "results") if r["config"]["output"] == "output"]
    assert [r["config"]["alpha"] for r in records] == [4.0, 8.0]
    backups = list(course_runs.glob("output.bak-*"))
    assert len(backups) == 1
    first = backups[0]
    assert (first / "adapter_model.bin").stat().st_size > 0 and (first / "adapter_config.json").is_file()
    assert json.loads((first / "training_metrics.json").read_text())["config"]["alpha"] == 4.0
    assert json.loads((course_runs / "output" / "training_metrics.json").read_text())["config"]["alpha"] == 8.0


def test_compare_ranks_table_markdown_and_png(course_runs, capsys, monkeypatch):
    monkeypatch.chdir(course_runs)
    utils.main(["compare_ranks", "--results_dir", "./results"])
    out = capsys.readouterr().out
    rows = table_rows(out, ["2", "4"])
    assert set(rows) == {"2", "4"}
    assert "512" in rows["2"] and "1,024" in rows["4"]  # 2 層 × (q, v) × r × (32 + 32)
    assert "rank_2" in rows["2"] and "->" in rows["2"]  # adapter 在哪、loss 從多少到多少
    # alpha 的 runs（rank 8）不能混進 rank 的比較：列為「未比較」並說明差在哪
    assert "alpha=4 (compared runs: 16)" in out and "alpha=8 (compared runs: 16)" in out

    image = matplotlib.image.imread(course_runs / "results" / "compare_rank.png")
    assert image.shape[0] > 300 and image.shape[1] > 900  # 三張並排的圖
    md = (course_runs / "results" / "compare_rank.md").read_text()
    assert re.search(r"^\| 2 \| 512 \|", md, re.M) and re.search(r"^\| 4 \| 1,024 \|", md, re.M)
    assert "(compare_rank.png)" in md


def test_compare_by_alpha_flags_runs_that_differ_in_another_key(course_runs, capsys, monkeypatch):
    monkeypatch.chdir(course_runs)
    utils.main(["compare", "--by", "alpha"])  # 預設 --results_dir results
    out = capsys.readouterr().out
    rows = table_rows(out, ["4", "8"])
    assert set(rows) == {"4", "8"}
    assert re.search(r"output\.bak-\d{8}-\d{6}\s*$", rows["4"])  # 第一個 alpha 的 adapter 在備份資料夾裡
    assert re.search(r"\boutput\s*$", rows["8"])
    assert "rank=2 (compared runs: 8)" in out and "rank=4 (compared runs: 8)" in out
    assert "python utils.py compare --by rank" in out
    assert (course_runs / "results" / "compare_alpha.md").is_file()


# ----------------------------------------------------------------------------------------------- grouping rules
def fake_record(folder, name, mtime_ns, **config):
    """A minimal run record (what compare reads), written as results/<name>.json."""
    cfg = {"model": "gpt2", "dataset": "fortunes", "target_modules": ["q_proj", "v_proj"], "rank": 8, "alpha": 16.0,
           "lr": 2e-4, "seed": 42, "max_steps": 60, "epochs": 3, "output": "output", "device": "auto",
           "eval_steps": 50} | config
    trainable = 36864 * cfg["rank"]
    record = {"config": cfg, "model": {"requested": cfg["model"], "used": cfg["model"]}, "status": "finished",
              "parameters": {"trainable": trainable, "total": 124439808 + trainable}, "adapter_bytes": 8 * trainable,
              "base_val_loss": 4.0, "base_val_perplexity": 54.6, "train_time_s": 90.0,
              "eval": [{"step": 60, "val_loss": 3.5, "val_perplexity": 33.1}],
              "train_loss": [{"step": s, "loss": 4.0 - s / 100} for s in range(1, 61)]}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record))
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_grouping_newest_duplicate_ignored_keys_and_flags(tmp_path):
    t = 1_800_000_000 * 10 ** 9
    fake_record(tmp_path, "20270101-000000_rank_4", t, rank=4, output="rank_4")
    fake_record(tmp_path, "20270101-000001_rank_8", t, rank=8, output="rank_8", device="cuda")  # device 不算
    fake_record(tmp_path, "20270101-000002_output", t, rank=8, eval_steps=10)  # 同一個 rank 又跑一次：較新
    fake_record(tmp_path, "20270101-000003_output", t, rank=8, alpha=4.0)  # alpha 不同
    fake_record(tmp_path, "20270101-000004_output", t, rank=16, lr=1e-3)  # lr 不同
    fake_record(tmp_path, "20270101-000005_output", t, rank=32, max_steps=None)  # 用 epochs 訓練：不同
    result = compare.group_runs(compare.load_records(tmp_path), "rank")
    assert [r["_file"].stem for r in result["shown"]] == ["20270101-000000_rank_4", "20270101-000002_output"]
    assert [r["_file"].stem for r in result["older"]["8"]] == ["20270101-000001_rank_8"]
    flags = {r["_file"].stem: diff for r, diff in result["flagged"]}
    assert flags == {"20270101-000003_output": {"alpha": (4.0, 16.0)},
                     "20270101-000004_output": {"lr": (1e-3, 2e-4)},
                     "20270101-000005_output": {"max_steps": (None, 60), "epochs": (3, None)}}
    lines = compare.notes(result, "rank")
    assert lines[0].startswith("rank=8: 2 runs; showing the newest")


def test_same_second_records_are_ordered_by_file_time(tmp_path):
    t = 1_800_000_000 * 10 ** 9
    fake_record(tmp_path, "20270101-000000_output-1", t + 10, rank=8, lr=1e-3)  # 同一秒的第二筆：檔名排前面
    fake_record(tmp_path, "20270101-000000_output", t, rank=8, lr=5e-4)
    shown = compare.group_runs(compare.load_records(tmp_path), "rank")["shown"]
    assert [r["config"]["lr"] for r in shown] == [1e-3]


def test_compare_by_target_modules_and_by_a_mistyped_key(tmp_path, capsys):
    t = 1_800_000_000 * 10 ** 9
    fake_record(tmp_path, "20270101-000000_qv", t, target_modules=["q_proj", "v_proj"])
    fake_record(tmp_path, "20270101-000001_all", t, target_modules=["all"], rank=8)
    compare.compare(tmp_path, "target_modules")
    out = capsys.readouterr().out
    assert set(table_rows(out, ["q_proj v_proj", "all"])) == {"q_proj v_proj", "all"}
    assert matplotlib.image.imread(tmp_path / "compare_target_modules.png").shape[1] > 900
    with pytest.raises(SystemExit) as e:
        utils.main(["compare", "--by", "alpah", "--results_dir", str(tmp_path)])
    assert e.value.code == "error: no run record has a setting 'alpah': did you mean 'alpha'?"


# ----------------------------------------------------------------------------------------------- inspect
def test_inspect_gpt2_random_init_gives_the_course_numbers(capsys):
    utils.main(["inspect", "--model", "gpt2", "--target_modules", "q_proj", "v_proj", "--rank", "8",
                "--random_init"])
    out = capsys.readouterr().out
    assert "294,912 trainable of 124,439,808 parameters: 422.0x fewer" in out
    assert len(re.findall(r"^transformer\.h\.\d+\.attn\.c_attn\s+Conv1D\s+768 -> 2304\s.*24,576$", out, re.M)) == 12
    assert "Training memory" in out and "ratio" in out


def test_inspect_local_folder_lists_every_wrapped_module(tiny_llama_dir, capsys):
    utils.main(["inspect", "--model", tiny_llama_dir, "--target_modules", "q_proj", "v_proj", "--rank", "4"])
    out = capsys.readouterr().out
    model = tiny_llama()
    inject_lora(model, ["q_proj", "v_proj"], 4, 16)
    trainable, _ = count_parameters(model)
    for layer in range(2):  # GQA：q 32 -> 32，v 32 -> 16
        assert re.search(rf"^model\.layers\.{layer}\.self_attn\.q_proj\s+Linear\s+32 -> 32\s", out, re.M)
        assert re.search(rf"^model\.layers\.{layer}\.self_attn\.v_proj\s+Linear\s+32 -> 16\s", out, re.M)
    assert re.search(rf"LoRA parameters \(trainable\)\s+{trainable:,}\s", out)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all"]])
def test_adapter_size_estimate_matches_the_saved_file(tmp_path, targets):
    model = tiny_gpt2()
    inject_lora(model, targets, 4, 8)
    estimate = utils.adapter_file_bytes(model)
    actual = Path(save_adapter(model, tmp_path, "tiny")).stat().st_size
    n_tensors = 2 * len(lora_layers(model))  # 每層一個 A、一個 B
    assert estimate <= actual < estimate + 1024 * n_tensors  # 差的只是 torch.save 的檔案框架（每個張量 < 1 KB）
    if targets == ["q_proj", "v_proj"]:  # q/v 切片存成一個 rank 2r 的 c_attn：數字比可訓練參數多
        assert estimate > 4 * count_parameters(model)[0]


def test_inspect_random_init_of_an_uncached_model_is_a_clear_error():
    with pytest.raises(SystemExit) as e:
        utils.main(["inspect", "--model", "no-such-org/no-such-model", "--random_init"])
    assert e.value.code.startswith("error: --random_init needs the architecture of 'no-such-org/no-such-model'")


# ----------------------------------------------------------------------------------------------- generate
@pytest.fixture
def trained_adapter(tmp_path, tiny_gpt2_dir):
    """An adapter on the tiny GPT-2 with non-zero B (a fresh adapter has B = 0 and changes nothing)."""
    model = tiny_gpt2()
    inject_lora(model, ["q_proj", "v_proj", "c_fc"], 4, 8)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    save_adapter(model, tmp_path / "adapter", tiny_gpt2_dir)
    return str(tmp_path / "adapter")


def test_generate_merged_and_unmerged_text_are_identical(trained_adapter, capsys):
    args = utils.build_parser().parse_args(["generate", "--adapter", trained_adapter, "--prompt", "the cat",
                                            "--max_new_tokens", "12", "--merge"])
    result = utils.generate(args)
    out = capsys.readouterr().out
    assert result["merged"] == result["adapter"]
    assert "Merged and unmerged text are identical" in out
    assert out.count("the cat" + result["adapter"]) == 2

    base = utils.generate(utils.build_parser().parse_args(
        ["generate", "--adapter", trained_adapter, "--prompt", "the cat", "--max_new_tokens", "12", "--no_adapter"]))
    assert base["base"] != result["adapter"]  # 確實載入了 adapter


def test_generate_never_swaps_in_another_model(tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "gpt2",
                                                             "r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]}))
    monkeypatch.setattr(models, "hub_is_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_cached_folder", lambda name: None)
    monkeypatch.setattr(models, "bundled_folder", lambda: pytest.fail("generate fell back to the bundled model"))
    with pytest.raises(SystemExit) as e:
        utils.main(["generate", "--adapter", str(adapter)])
    assert e.value.code.startswith("error: base model 'gpt2' unavailable, and generate never swaps in another model")


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "error: unknown sub-command 'frobnicate': choose one of compare_ranks, compare, inspect"),
    (["compare_rank"], "error: unknown sub-command 'compare_rank': did you mean compare_ranks?"),
    (["compare_ranks", "--results_dir", "missing"], "error: results directory not found: missing"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    result = run_utils(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_generate_without_an_adapter_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        utils.main(["generate", "--adapter", str(tmp_path / "missing")])
    assert e.value.code.startswith(f"error: no adapter_config.json in {tmp_path / 'missing'}: pass the --output")


def test_empty_results_dir_is_a_clear_error(tmp_path):
    (tmp_path / "notes.json").write_text("[1, 2]")  # 不是 run 紀錄的 JSON 會被跳過
    with pytest.raises(SystemExit) as e:
        utils.main(["compare_ranks", "--results_dir", str(tmp_path)])
    assert e.value.code.startswith(f"error: no run records (*.json) in {tmp_path}")


def test_help_lists_the_sub_commands(tmp_path):
    result = run_utils("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in utils.COMMANDS:
        assert command in result.stdout
    assert run_utils("compare", "--help", cwd=tmp_path).stdout.startswith("usage: utils.py compare")
