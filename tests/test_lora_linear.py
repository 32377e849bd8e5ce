"""lora_linear.py against the definition itself and against peft as an independent oracle."""
import json
import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from lora_linear import (LoRAError, LoRAFusedQKV, LoRALinear, count_parameters, inject_lora, load_adapter,
                         lora_layers, lora_state_dict, merge_lora, save_adapter, unmerge_lora)
from tiny import tiny_gpt2, tiny_llama

TOKENS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def randomize_lora(model, seed=1):
    """Non-zero B (and fresh A), so the LoRA path really changes the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ----------------------------------------------------------------- the layer itself
def test_init_kaiming_uniform_A_and_zero_B():
    layer = LoRALinear(nn.Linear(64, 48), rank=8, alpha=16)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5): gain = √(2/(1+5)), bound = gain·√(3/fan_in) = 1/√fan_in
    A = layer.lora_A.weight
    assert A.shape == (8, 64) and layer.lora_B.weight.shape == (48, 8)
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound  # uniform on [-bound, bound], really spread
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.scaling == 2.0


def test_rslora_scaling():
    assert LoRALinear(nn.Linear(8, 8), rank=4, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(4)


def test_forward_is_the_formula():
    base = nn.Linear(16, 12)
    layer = LoRALinear(base, rank=4, alpha=8)
    randomize_lora(layer)
    x = torch.randn(3, 5, 16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + (x @ A.T @ B.T) * (8 / 4)
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_and_linear_same_function():
    linear = nn.Linear(16, 24)
    conv = Conv1D(24, 16)  # Conv1D(nf=out, nx=in): weight [in, out]
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    a, b = LoRALinear(linear, 4, 8), LoRALinear(conv, 4, 8)
    randomize_lora(a)
    b.load_state_dict(a.state_dict() | {"base_layer.weight": conv.weight})
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(a(x), b(x))
    a.merge(), b.merge()
    torch.testing.assert_close(linear.weight.T, conv.weight)  # merged deltas are transposes of each other
    torch.testing.assert_close(a(x), b(x))


def test_lora_weights_stay_float32_on_half_base():
    layer = LoRALinear(nn.Linear(16, 16).to(torch.bfloat16), 4, 8)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    out = layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_dropout_zero_does_no_work_and_nonzero_is_dropout():
    assert isinstance(LoRALinear(nn.Linear(4, 4), 2, 4).lora_dropout, nn.Identity)
    assert LoRALinear(nn.Linear(4, 4), 2, 4, dropout=0.1).lora_dropout.p == 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0, alpha=16), "rank must be a positive integer"),
    (dict(rank=-2, alpha=16), "rank must be a positive integer"),
    (dict(rank=8, alpha=0), "alpha must be > 0"),
    (dict(rank=8, alpha=16, dropout=1.0), "dropout must be in [0, 1)"),
    (dict(rank=8, alpha=16, dropout=-0.1), "dropout must be in [0, 1)"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(LoRAError, match=message.replace("[", r"\[").replace(")", r"\)")):
        inject_lora(tiny_gpt2(), ["c_attn"], **kwargs)


# ----------------------------------------------------------------- injected into a model
@pytest.mark.parametrize("make, targets", [(tiny_gpt2, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"]),
                                           (tiny_gpt2, ["all"]), (tiny_llama, ["q_proj", "v_proj"]),
                                           (tiny_llama, ["all"])])
def test_zero_init_is_exactly_the_base_model(make, targets):
    base = logits(make())
    model = make()
    inject_lora(model, targets, rank=4, alpha=8)
    assert torch.equal(logits(model), base)


def test_only_lora_trains_and_gradients_follow_the_math():
    model = tiny_gpt2()
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(TOKENS, labels=TOKENS).loss.backward()
    for n, p in model.named_parameters():
        if ".lora_B." in n:  # dL/dB = (dL/dh)ᵀ · (A x)·s ≠ 0 because A ≠ 0
            assert p.grad.abs().sum() > 0, n
        elif ".lora_A." in n:  # dL/dA = Bᵀ (dL/dh) xᵀ · s = 0 because B = 0
            assert torch.count_nonzero(p.grad) == 0, n
        else:
            assert p.grad is None, n
    opt.step()
    opt.zero_grad()
    model(TOKENS, labels=TOKENS).loss.backward()  # B moved, so now A gets a gradient too
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == p.requires_grad, n


@pytest.mark.parametrize("make, targets", [(tiny_gpt2, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_fc"]),
                                           (tiny_gpt2, ["all"]), (tiny_llama, ["all"])])
def test_merge_equals_unmerged_and_unmerge_restores(make, targets):
    model = make()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, targets, rank=4, alpha=8)
    randomize_lora(model)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(make()), atol=1e-3)  # LoRA really changes the function
    merge_lora(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    merge_lora(model)  # merging twice is a no-op, never a double add
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        for k, v in layer.base_layer.state_dict().items():
            torch.testing.assert_close(v, base_weights[f"{name}.{k}"], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_qv_slices_leave_k_untouched():
    model = tiny_gpt2()
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRAFusedQKV) and layer.slices == ("q", "v")
    x = torch.randn(2, 5, 32)
    base_out = layer.base_layer(x)
    randomize_lora(layer)
    out = layer(x)
    d = 32
    torch.testing.assert_close(out[..., d:2 * d], base_out[..., d:2 * d], atol=0, rtol=0)  # k: bit-identical
    assert not torch.allclose(out[..., :d], base_out[..., :d])  # q changed
    assert not torch.allclose(out[..., 2 * d:], base_out[..., 2 * d:])  # v changed
    layer.merge()  # merged weight: k columns of the Conv1D weight are untouched
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=0)


def test_gpt2_124m_counts():
    model = GPT2LMHeadModel(GPT2Config())
    assert count_parameters(model) == (124_439_808, 124_439_808)
    inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16)
    trainable, total = count_parameters(model)
    assert trainable == 12 * 2 * (768 * 8 + 8 * 768) == 294_912
    assert round((total - trainable) / trainable) == 422
    model = GPT2LMHeadModel(GPT2Config())
    inject_lora(model, ["c_attn"], rank=8, alpha=16)
    assert count_parameters(model)[0] == 12 * (768 * 8 + 8 * 2304) == 294_912


def test_llama_gqa_v_proj_counts_kv_heads():
    model = tiny_llama()  # hidden 32, 4 heads → head_dim 8, 2 kv heads → v_proj out = 16
    inject_lora(model, ["v_proj"], rank=4, alpha=8)
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.lora_B.weight.shape == (2 * 8, 4)
    assert count_parameters(model)[0] == 2 * (32 * 4 + 4 * 16)


def test_all_never_wraps_lm_head_or_embeddings():
    for make in (tiny_gpt2, tiny_llama):
        names = inject_lora(make(), ["all"], rank=2, alpha=4)
        assert names and not any("lm_head" in n or "wte" in n or "embed" in n for n in names)
    assert len(inject_lora(tiny_gpt2(), ["all"], 2, 4)) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert len(inject_lora(tiny_llama(), ["all"], 2, 4)) == 2 * 7  # q k v o gate up down


def test_suffix_and_logical_names():
    names = inject_lora(tiny_gpt2(), ["mlp.c_proj"], 2, 4)
    assert names == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    names = inject_lora(tiny_gpt2(), ["o_proj"], 2, 4)
    assert names == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def test_unknown_target_lists_candidates():
    with pytest.raises(LoRAError, match="'query' matches nothing.*q_proj.*c_attn"):
        inject_lora(tiny_gpt2(), ["query"], 8, 16)
    with pytest.raises(LoRAError, match="gate_proj"):
        inject_lora(tiny_llama(), ["c_attn"], 8, 16)


def test_wrapped_layers_keep_the_models_train_eval_mode(tmp_path):
    model = tiny_gpt2()  # eval mode
    inject_lora(model, ["c_attn"], 2, 4, dropout=0.5)
    randomize_lora(model)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(logits(model), logits(model))  # no dropout in eval mode: deterministic
    save_adapter(model, tmp_path, "tiny")
    reloaded = tiny_gpt2()
    load_adapter(reloaded, tmp_path)
    assert not any(m.training for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded), logits(model))


def test_inject_twice_is_an_error():
    model = tiny_gpt2()
    inject_lora(model, ["c_attn"], 2, 4)
    with pytest.raises(LoRAError, match="already has LoRA"):
        inject_lora(model, ["c_attn"], 2, 4)


def test_lora_state_dict_has_only_lora_weights():
    model = tiny_gpt2()
    inject_lora(model, ["q_proj", "v_proj"], 2, 4)
    sd = lora_state_dict(model)
    assert len(sd) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    assert sum(v.numel() for v in sd.values()) == count_parameters(model)[0]


# ----------------------------------------------------------------- PEFT format, with peft as the oracle
@pytest.mark.parametrize("make, targets", [(tiny_gpt2, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"]),
                                           (tiny_gpt2, ["all"]), (tiny_gpt2, ["q_proj", "v_proj", "o_proj"]),
                                           (tiny_llama, ["q_proj", "v_proj"]), (tiny_llama, ["all"])])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_our_adapter_to_the_same_logits(tmp_path, make, targets, use_rslora):
    from peft import PeftModel

    model = make()
    inject_lora(model, targets, rank=4, alpha=8, use_rslora=use_rslora)
    randomize_lora(model)
    ours = logits(model)
    save_adapter(model, tmp_path, "tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] and config["use_rslora"] == use_rslora
    peft_model = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=0)
    reloaded = make()  # and our own loader gives the same function back
    load_adapter(reloaded, tmp_path)
    torch.testing.assert_close(logits(reloaded), ours, atol=1e-5, rtol=0)


def test_qv_export_is_rank_2r_with_2alpha(tmp_path):
    model = tiny_gpt2()
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    save_adapter(model, tmp_path, "gpt2")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16, ["c_attn"])
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == "gpt2"
    state = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    B = state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (96, 8) and torch.count_nonzero(B[32:64]) == 0  # k rows are zero


@pytest.mark.parametrize("make, targets", [(tiny_gpt2, ["c_attn"]), (tiny_llama, ["q_proj", "v_proj"])])
def test_we_load_an_adapter_written_by_peft(tmp_path, make, targets):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                   fan_in_fan_out=make is tiny_gpt2, task_type="CAUSAL_LM"))
    randomize_lora(peft_model)
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    model = make()
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_load_is_strict(tmp_path):
    model = tiny_gpt2()
    inject_lora(model, ["c_attn"], 4, 8)
    save_adapter(model, tmp_path, "tiny")
    path = tmp_path / "adapter_model.bin"
    state = torch.load(path, weights_only=True)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"

    torch.save({k: v for k, v in state.items() if k != key}, path)
    with pytest.raises(LoRAError, match="missing key " + key):
        load_adapter(tiny_gpt2(), tmp_path)
    torch.save(state | {"base_model.model.transformer.h.1.attn.c_attn.lora_C.weight": state[key]}, path)
    with pytest.raises(LoRAError, match="unexpected key .*lora_C"):
        load_adapter(tiny_gpt2(), tmp_path)
    torch.save(state, path)
    bigger = tiny_gpt2(n_embd=64)
    with pytest.raises(LoRAError, match="shape mismatch for .*lora_A.weight.*for tiny"):
        load_adapter(bigger, tmp_path)
    assert not lora_layers(bigger)  # a failed load leaves the model untouched
    (tmp_path / "adapter_model.bin").unlink()
    with pytest.raises(LoRAError, match="no adapter_model.bin"):
        load_adapter(tiny_gpt2(), tmp_path)


def test_save_is_atomic_and_checked(tmp_path, monkeypatch):
    model = tiny_gpt2()
    inject_lora(model, ["c_attn"], 4, 8)
    save_adapter(model, tmp_path, "tiny")
    good = (tmp_path / "adapter_model.bin").read_bytes()
    randomize_lora(model)

    def broken_save(obj, f):  # a crash halfway through writing
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path, "tiny")
    assert (tmp_path / "adapter_model.bin").read_bytes() == good  # the earlier adapter survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    with pytest.raises(LoRAError, match="no LoRA layers"):
        save_adapter(tiny_gpt2(), tmp_path, "tiny")


def test_real_size_models_match_peft(tmp_path):
    """The GPT-2 124M and a SmolLM2-shaped (GQA 9/3) architecture, random init, against peft."""
    from peft import PeftModel

    small = dict(num_hidden_layers=2)  # full width, fewer layers: same shapes per layer, fast on CPU
    cases = [(lambda: GPT2LMHeadModel(GPT2Config(n_layer=2)), ["q_proj", "v_proj"]),
             (lambda: LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                                   num_key_value_heads=3, vocab_size=49152, **small)),
              ["q_proj", "v_proj"])]
    for i, (make, targets) in enumerate(cases):
        torch.manual_seed(0)
        base = make().eval()
        state = {k: v.clone() for k, v in base.state_dict().items()}
        inject_lora(base, targets, rank=8, alpha=16)
        randomize_lora(base)
        ours = logits(base)
        save_adapter(base, tmp_path / str(i), "real")
        fresh = make().eval()
        fresh.load_state_dict(state)
        torch.testing.assert_close(logits(PeftModel.from_pretrained(fresh, str(tmp_path / str(i)))), ours,
                                   atol=1e-4, rtol=0)
