"""train_lora_basic.py end to end on tiny random-init models (and one short run on the bundled SmolLM2)."""
import json
import subprocess
import sys

import matplotlib.image
import pytest
import torch

import train_lora_basic
from config import Config, load_config
from errors import UserError
from lora_linear import load_adapter
from tiny import CORPUS, save_tiny_model, tiny_gpt2, tiny_llama

ROOT = train_lora_basic.__file__.rsplit("/", 1)[0]


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory):
    """A small learnable corpus: the same few sentences, entries separated by blank lines."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(CORPUS * 10))
    return str(path)


def train(tmp_path, *flags):
    """Run the real entry point in-process; returns the metrics dict of the finished run."""
    out = tmp_path / "out"
    train_lora_basic.main(["--output", str(out), "--results_dir", str(tmp_path / "results"),
                           "--logdir", str(tmp_path / "logs"), *map(str, flags)])
    return json.loads((out / "training_metrics.json").read_text()), out


def tiny_flags(model_dir, corpus, **overrides):
    flags = dict(model=model_dir, dataset=corpus, max_length=32, batch_size=4, max_steps=4, eval_steps=2,
                 sample_max_new_tokens=4, lr=1e-2)
    flags.update(overrides)
    return [item for key, value in flags.items() for item in (f"--{key}", value)]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_every_output_is_written_and_valid(tmp_path, kind, tiny_gpt2_dir, tiny_llama_dir, corpus_txt):
    from peft import PeftModel

    model_dir, make = (tiny_gpt2_dir, tiny_gpt2) if kind == "gpt2" else (tiny_llama_dir, tiny_llama)
    metrics, out = train(tmp_path, *tiny_flags(model_dir, corpus_txt))
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.bin", "adapter_config.json", "training_loss_curve.png", "training_metrics.json",
            "model_comparison.txt", "training_log.txt", "run_config.yaml"} <= names
    assert "checkpoint.pt" not in names  # a finished run leaves no resume file

    for key in ("status", "model", "config", "train_loss", "eval", "base_val_loss", "base_val_perplexity",
                "final_val_loss", "final_val_perplexity", "wall_time_s", "tokens_per_sec", "memory", "parameters"):
        assert key in metrics, key
    assert metrics["status"] == "finished" and metrics["steps_done"] == 4
    assert [e["step"] for e in metrics["eval"]] == [2, 4] and len(metrics["train_loss"]) == 4
    assert metrics["model"]["used"] == model_dir and metrics["model"]["fallback_reason"] is None
    assert metrics["memory"]["measured_bytes"] > 0

    image = matplotlib.image.imread(out / "training_loss_curve.png")
    assert image.shape[0] > 300 and image.shape[1] > 500
    comparison = (out / "model_comparison.txt").read_text()
    assert f"{metrics['parameters']['trainable']:,}" in comparison
    assert "Base model validation loss" in (out / "training_log.txt").read_text()

    # the adapter loads back into a fresh base model, with our loader and with peft, to the same function
    x = torch.randint(0, 300, (2, 16))
    ours = make()
    load_adapter(ours, out)
    peft_model = PeftModel.from_pretrained(make(), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, peft_model(x).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(ours(x).logits, make()(x).logits)  # training changed something

    records = list((tmp_path / "results").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["final_val_loss"] == metrics["final_val_loss"]


def test_loss_falls_on_a_learnable_corpus(tmp_path, tiny_gpt2_dir, corpus_txt):
    metrics, _ = train(tmp_path, *tiny_flags(tiny_gpt2_dir, corpus_txt, max_steps=20, eval_steps=10, lr=3e-2,
                                             batch_size=8, target_modules="all", dropout=0))
    first_train = sum(r["loss"] for r in metrics["train_loss"][:3]) / 3
    last_train = sum(r["loss"] for r in metrics["train_loss"][-3:]) / 3
    assert metrics["final_val_loss"] < metrics["base_val_loss"] - 0.05
    assert last_train < first_train - 0.05


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_gpt2_dir, corpus_txt, monkeypatch):
    """8 micro-batches of 1 block, loss normalised by the step's token count == 1 batch of 8 blocks."""
    # With SGD the update is -lr * gradient, so equal updates mean equal gradients. (AdamW's first step is
    # ~lr * sign(g): it would blow float summation-order noise in near-zero gradients up to 2 * lr.)
    monkeypatch.setattr(torch.optim, "AdamW", torch.optim.SGD)
    # GPT-2's own dropout (0.1) would draw different masks for 1 x 8 and 8 x 1 blocks: switch it off.
    model_dir = save_tiny_model(tiny_gpt2(resid_pdrop=0, embd_pdrop=0, attn_pdrop=0), tmp_path / "no_dropout")
    states = []
    for batch, accum in ((8, 1), (1, 8)):
        _, out = train(tmp_path / f"{batch}x{accum}", *tiny_flags(
            model_dir, corpus_txt, max_steps=1, batch_size=batch, gradient_accumulation_steps=accum,
            dropout=0, eval_steps=1))
        states.append(torch.load(out / "adapter_model.bin", weights_only=True))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=0)
    assert any(v.abs().sum() > 0 for k, v in states[0].items() if "lora_B" in k)  # the step really moved B


def test_flag_beats_yaml_beats_default(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("rank: 4\nalpha: 8\nlr: 2e-4\n")  # 2e-4 is a *string* to YAML 1.1; we accept it
    cfg, flags = load_config(["--config", str(yaml_file), "--rank", "16", "--target_modules", "q_proj", "k_proj"])
    assert cfg.rank == 16 and cfg.alpha == 8 and cfg.lr == 2e-4
    assert cfg.target_modules == ["q_proj", "k_proj"] and cfg.epochs == Config().epochs
    assert flags == {"rank", "target_modules"}
    with pytest.raises(UserError, match="unknown key 'rnak' in .*did you mean 'rank'"):
        yaml_file.write_text("rnak: 4\n")
        load_config(["--config", str(yaml_file)])
    with pytest.raises(UserError, match="did you mean --rank"):
        load_config(["--rnak", "4"])


def test_the_shipped_config_yaml_is_the_default_recipe():
    cfg, _ = load_config(["--config", f"{ROOT}/config.yaml"])
    assert cfg == Config()  # config.yaml documents exactly the built-in defaults


def test_cpu_budget_caps_only_what_you_did_not_type(tmp_path):
    cfg = Config(max_steps=None, max_length=256, gradient_accumulation_steps=4)
    lines = []
    train_lora_basic.apply_cpu_budget(cfg, {"max_length"}, lines.append)
    assert (cfg.max_steps, cfg.max_length, cfg.gradient_accumulation_steps) == (60, 256, 1)
    assert "CPU budget" in lines[0] and "max_length" not in lines[0]


def test_offline_fallback_runs_the_bundled_smollm2(tmp_path, corpus_txt, monkeypatch):
    """`--model gpt2` with no Hub and no cache falls back to the bundled SmolLM2 and says so everywhere."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.chdir(tmp_path)
    run = subprocess.run([sys.executable, f"{ROOT}/train_lora_basic.py", "--model", "gpt2", "--dataset", corpus_txt,
                          "--max_length", "32", "--batch_size", "2", "--max_steps", "2", "--eval_steps", "2",
                          "--eval_max_blocks", "2", "--sample_max_new_tokens", "3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "OFFLINE FALLBACK" in run.stdout
    metrics = json.loads((tmp_path / "output" / "training_metrics.json").read_text())
    assert metrics["model"]["requested"] == "gpt2" and metrics["model"]["used"] == "smollm2-135m"
    assert "unreachable" in metrics["model"]["fallback_reason"]
    assert "requested gpt2" in (tmp_path / "output" / "model_comparison.txt").read_text()
    assert "OFFLINE FALLBACK" in (tmp_path / "output" / "training_log.txt").read_text()
    config = json.loads((tmp_path / "output" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m"
    # SmolLM2: 30 layers, q_proj 576 -> 576, v_proj 576 -> 192 (3 key/value heads x 64)
    assert metrics["parameters"]["trainable"] == 30 * ((576 * 8 + 8 * 576) + (576 * 8 + 8 * 192))
