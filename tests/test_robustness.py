"""Every bad input: non-zero exit, one `error:` line naming the problem and the fix, no traceback, nothing lost."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_lora_basic
from lora_linear import load_adapter
from tiny import CORPUS, save_tiny_model, tiny_gpt2

ROOT = os.path.dirname(train_lora_basic.__file__)
SCRIPT = os.path.join(ROOT, "train_lora_basic.py")


@pytest.fixture(scope="module")
def corpus_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(CORPUS * 10))
    return str(path)


def cli(*args, cwd, env=None):
    """Run the real entry point as a new user would."""
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def assert_one_line_error(run, *fragments):
    assert run.returncode != 0
    assert "Traceback" not in run.stderr + run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), run.stderr[-1500:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def tiny(model_dir, corpus, *extra):
    return ["--model", model_dir, "--dataset", corpus, "--max_length", 32, "--batch_size", 4, "--max_steps", 4,
            "--eval_steps", 2, "--sample_max_new_tokens", 3, *extra]


# ------------------------------------------------------------------------------------------------- 1. config
@pytest.mark.parametrize("args, fragments", [
    (["--rnak", "4"], ["unrecognized arguments: --rnak", "did you mean --rank?"]),
    (["--rank", "eight"], ["rank must be an integer, got 'eight'"]),
    (["--rank", "0"], ["rank must be a positive integer, got 0", "--rank 8"]),
    (["--rank", "-4"], ["rank must be a positive integer"]),
    (["--alpha", "0"], ["alpha must be > 0"]),
    (["--dropout", "1"], ["dropout must be in [0, 1)"]),
    (["--lr", "0"], ["lr must be > 0", "1e-4 to 5e-4"]),
    (["--lr=-1e-4"], ["lr must be > 0"]),
    (["--batch_size", "0"], ["batch_size must be >= 1"]),
    (["--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps must be >= 1"]),
    (["--config", "missing.yaml"], ["config file not found: missing.yaml"]),
    (["--lr_scheduler", "cosin"], ["lr_scheduler must be one of", "cosine", "got 'cosin'"]),
])
def test_config_errors(tmp_path, args, fragments):
    assert_one_line_error(cli(*args, cwd=tmp_path), *fragments)
    assert not (tmp_path / "output").exists()  # failed before anything was written


@pytest.mark.parametrize("text, fragments", [
    ("rnak: 4\n", ["unknown key 'rnak'", "did you mean 'rank'?"]),
    ("rank: eight\n", ["rank must be an integer, got 'eight'"]),
    ("rank: 8\nalpha: [16\n", ["not valid YAML at line 3, column 1"]),
    ("- rank\n", ["must be a mapping"]),
])
def test_yaml_errors(tmp_path, text, fragments):
    (tmp_path / "c.yaml").write_text(text)
    assert_one_line_error(cli("--config", "c.yaml", cwd=tmp_path), *fragments)


def test_debug_shows_the_traceback(tmp_path):
    run = cli("--rank", "0", "--debug", "--model", "./nope", cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" in run.stderr


# ------------------------------------------------------------------------------------------------- 2. model, targets
def test_model_path_not_found(tmp_path):
    assert_one_line_error(cli("--model", "./no_such_model", cwd=tmp_path), "model path not found")


def test_offline_without_fallback(tmp_path):
    run = cli("--model", "gpt2", "--offline_fallback", "null", cwd=tmp_path,
              env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert_one_line_error(run, "cannot load 'gpt2'", "--model smollm2-135m")


def test_target_matches_nothing(tmp_path, tiny_gpt2_dir, corpus_txt):
    run = cli(*tiny(tiny_gpt2_dir, corpus_txt, "--target_modules", "query"), cwd=tmp_path)
    assert_one_line_error(run, "target module 'query' matches nothing", "q_proj", "c_attn")


def test_max_length_beyond_context(tmp_path, tiny_gpt2_dir, corpus_txt):
    run = cli(*tiny(tiny_gpt2_dir, corpus_txt, "--max_length", 256), cwd=tmp_path)
    assert_one_line_error(run, "max_length 256 exceeds", "context of 128", "--max_length 128")


# ------------------------------------------------------------------------------------------------- 3. data
def test_dataset_file_missing(tmp_path, tiny_gpt2_dir):
    run = cli(*tiny(tiny_gpt2_dir, "missing.txt"), cwd=tmp_path)
    assert_one_line_error(run, "dataset file not found", "--dataset fortunes")


def test_dataset_empty(tmp_path, tiny_gpt2_dir):
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(cli(*tiny(tiny_gpt2_dir, "empty.txt"), cwd=tmp_path), "dataset file is empty")


def test_dataset_too_small(tmp_path, tiny_gpt2_dir):
    (tmp_path / "small.txt").write_text("one short line.\n\nand another.")
    assert_one_line_error(cli(*tiny(tiny_gpt2_dir, "small.txt"), cwd=tmp_path),
                          "not enough text for max_length=32", "smaller --max_length")


def test_unknown_dataset_offline(tmp_path, tiny_gpt2_dir):
    run = cli(*tiny(tiny_gpt2_dir, "no_such_org/no_such_dataset"), cwd=tmp_path,
              env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(run, "cannot load dataset 'no_such_org/no_such_dataset'", "--dataset fortunes")


# ------------------------------------------------------------------------------------------------- 4. precision, device
def test_fp16_on_cpu_falls_back_with_a_notice(tmp_path, tiny_gpt2_dir, corpus_txt):
    run = cli(*tiny(tiny_gpt2_dir, corpus_txt, "--fp16"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-1500:]
    assert "fp16 needs a CUDA GPU; training in float32 on CPU" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path):
    assert_one_line_error(cli("--device", "cuda", cwd=tmp_path), "no CUDA GPU is visible", "--device cpu")


def run_in_process(tmp_path, model_dir, corpus, *extra):
    out = tmp_path / "out"
    train_lora_basic.main([*map(str, tiny(model_dir, corpus, "--output", out, "--results_dir", tmp_path / "results",
                                          "--logdir", tmp_path / "logs", *extra))])
    return out


def fail_training_call(monkeypatch, n, make_failure):
    """Make the n-th training-mode call of lm_loss fail the way `make_failure` says."""
    real, calls = train_lora_basic.lm_loss, []

    def patched(model, x, amp):
        if model.training:
            calls.append(1)
            if len(calls) == n:
                return make_failure(real(model, x, amp))
        return real(model, x, amp)

    monkeypatch.setattr(train_lora_basic, "lm_loss", patched)


def test_cuda_out_of_memory_gives_advice(tmp_path, tiny_gpt2_dir, corpus_txt, monkeypatch, capsys):
    def oom(_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    fail_training_call(monkeypatch, 1, oom)
    with pytest.raises(SystemExit) as e:
        run_in_process(tmp_path, tiny_gpt2_dir, corpus_txt)
    message = str(e.value.code)
    assert message.startswith("error: CUDA out of memory")
    for advice in ("--batch_size", "--gradient_accumulation_steps", "--max_length", "--fp16", "distilgpt2"):
        assert advice in message


# ------------------------------------------------------------------------------------------------- 5. training faults
def test_nonfinite_loss_stops_and_keeps_the_last_good_adapter(tmp_path, tiny_gpt2_dir, corpus_txt, monkeypatch):
    fail_training_call(monkeypatch, 3, lambda result: (result[0] * float("nan"), result[1]))  # step 3 of 4
    with pytest.raises(SystemExit) as e:
        run_in_process(tmp_path, tiny_gpt2_dir, corpus_txt)
    message = str(e.value.code)
    assert "loss became NaN/inf at step 3" in message and "lower --lr" in message and "--bf16" in message
    assert "adapter from step 2 is kept" in message
    model = tiny_gpt2()
    load_adapter(model, tmp_path / "out")  # the step-2 adapter on disk is whole and finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ctrl_c_saves_a_loadable_adapter_and_metrics(tmp_path, tiny_gpt2_dir, corpus_txt):
    args = tiny(tiny_gpt2_dir, corpus_txt, "--max_steps", 100000, "--eval_steps", 100000)
    # 在背景執行的 shell（例如 `bash .ci/run &`）底下，子行程繼承「忽略 SIGINT」，Python 就不會把它變成
    # KeyboardInterrupt；像在終端機裡一樣，先把 SIGINT 還原成預設。
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until training has really started
        if line.startswith("LoRA on"):
            break
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-1500:]
    assert "Traceback" not in stdout + stderr
    assert "Interrupted at step" in stdout and "--resume output" in stdout
    out = tmp_path / "output"
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["status"] == "interrupted" and 0 < metrics["steps_done"] < 100000
    load_adapter(tiny_gpt2(), out)
    assert (out / "checkpoint.pt").exists() and (out / "training_loss_curve.png").exists()
    assert not (tmp_path / "results").exists()  # an unfinished run is not a result to compare


# ------------------------------------------------------------------------------------------------- 6. resume
def test_resume_ends_with_the_same_adapter(tmp_path, corpus_txt, monkeypatch):
    # GPT-2 dropout 0.1 and LoRA dropout 0.1: the RNG state must be restored too, not just weights and optimizer
    model_dir = save_tiny_model(tiny_gpt2(), tmp_path / "model")
    extra = ["--max_steps", 6, "--gradient_accumulation_steps", 2, "--batch_size", 2, "--dropout", 0.1]
    straight = run_in_process(tmp_path / "straight", model_dir, corpus_txt, *extra)

    fail_training_call(monkeypatch, 4 * 2 - 1, lambda _: (_ for _ in ()).throw(KeyboardInterrupt))  # mid step 4
    with pytest.raises(SystemExit) as e:
        run_in_process(tmp_path / "resumed", model_dir, corpus_txt, *extra)
    assert e.value.code == 130
    out = tmp_path / "resumed" / "out"
    assert json.loads((out / "training_metrics.json").read_text())["steps_done"] == 3
    monkeypatch.undo()
    train_lora_basic.main(["--resume", str(out)])

    a = torch.load(straight / "adapter_model.bin", weights_only=True)
    b = torch.load(out / "adapter_model.bin", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-7, rtol=0)
    ma = json.loads((straight / "training_metrics.json").read_text())
    mb = json.loads((out / "training_metrics.json").read_text())
    assert [r["loss"] for r in mb["train_loss"]] == pytest.approx([r["loss"] for r in ma["train_loss"]], abs=1e-6)
    assert mb["status"] == "finished" and not (out / "checkpoint.pt").exists()


def test_resume_without_checkpoint(tmp_path):
    (tmp_path / "done").mkdir()
    assert_one_line_error(cli("--resume", "done", cwd=tmp_path), "nothing to resume in done")


# ------------------------------------------------------------------------------------------------- 7. output safety
def test_unwritable_output_fails_before_training(tmp_path, tiny_gpt2_dir, corpus_txt):
    (tmp_path / "a_file").write_text("not a directory")
    run = cli(*tiny(tiny_gpt2_dir, corpus_txt, "--output", "a_file/out"), cwd=tmp_path)
    assert_one_line_error(run, "output directory a_file/out is not writable", "choose another --output")
    assert "Base model validation loss" not in run.stdout  # nothing was trained


def test_a_second_run_never_destroys_the_first(tmp_path, tiny_gpt2_dir, corpus_txt):
    for alpha in (8, 32):  # the course's alpha loop gives no --output
        assert cli(*tiny(tiny_gpt2_dir, corpus_txt, "--alpha", alpha), cwd=tmp_path).returncode == 0
    backups = list(tmp_path.glob("output.bak-*"))
    assert len(backups) == 1
    first = json.loads((backups[0] / "training_metrics.json").read_text())
    second = json.loads((tmp_path / "output" / "training_metrics.json").read_text())
    assert (first["config"]["alpha"], second["config"]["alpha"]) == (8, 32)
    load_adapter(tiny_gpt2(), backups[0])
    assert len(list((tmp_path / "results").glob("*.json"))) == 2
