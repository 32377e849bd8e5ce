"""
lora_linear.py — 手寫 LoRA（Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685）

這是課程的參考答案。整個方法只有一個式子（論文 §4.1 式 (3)）：

    h = W0 x + ΔW x = W0 x + (α / r) · B A x        W0: [out, in] 凍結；A: [r, in]；B: [out, r]；r << min(in, out)

        x ──┬──► base_layer（W0，凍結）─────────────────────────────┐
            │                                                        (+) ──► h
            └──► dropout ──► lora_A（r×in）──► lora_B（out×r）──► ×α/r ┘

本檔內容（由上而下閱讀即可）：
  1. LoRALinear      —— 包住一個 nn.Linear 或 GPT-2 的 Conv1D（權重存成 [in, out]）
  2. LoRAFusedQKV    —— GPT-2 的 c_attn 把 q|k|v 融合成一個 768→2304 的投影；只對選定的切片加 LoRA
  3. inject_lora     —— 依模組名稱把 LoRA 注入模型（q_proj / v_proj / c_attn / all ...）
  4. merge / unmerge、lora_state_dict、count_parameters
  5. save_adapter / load_adapter —— PEFT 的磁碟格式（adapter_model.bin + adapter_config.json）

只依賴 torch；若裝了 transformers，會認得它的 Conv1D。
"""
import json
import math
import os
import re
from collections import Counter

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D  # GPT-2 的「轉置」線性層：weight 形狀是 [in, out]
    LAYER_TYPES = (nn.Linear, Conv1D)
except ImportError:  # 沒裝 transformers 也能用 nn.Linear 版本
    LAYER_TYPES = (nn.Linear,)
QKV = ("q", "k", "v")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.bin", "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class LoRAError(ValueError):
    """A LoRA setting or adapter file the user can fix; the message says what and how."""


def _in_out(layer):
    """(in_features, out_features) of a Linear ([out, in] weight) or a Conv1D ([in, out] weight)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    in_features, out_features = layer.weight.shape  # Conv1D：weight 存成 [in, out]
    return in_features, out_features


def _check_hparams(rank, alpha, dropout):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoRAError(f"rank must be a positive integer, got {rank!r}: try --rank 8")
    if not alpha > 0:
        raise LoRAError(f"alpha must be > 0, got {alpha!r}: try --alpha 16 (alpha = 2 x rank is common)")
    if not 0 <= dropout < 1:
        raise LoRAError(f"dropout must be in [0, 1), got {dropout!r}: try --dropout 0.05")


class _LoRABase(nn.Module):
    """What every LoRA layer shares: the frozen base layer, the scaling, dropout, merge/unmerge."""

    def __init__(self, base_layer, rank, alpha, dropout=0.0, use_rslora=False):
        super().__init__()
        _check_hparams(rank, alpha, dropout)
        self.base_layer = base_layer
        self.in_features, self.out_features = _in_out(base_layer)
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        # α/r：固定 α 時，改變 r 不必重新調學習率（論文 §4.1）。rsLoRA（Kalajdzievski 2023）用 α/√r，
        # 讓大 rank 時更新量不會被壓得太小。
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        # dropout=0 時用 Identity：不做任何多餘的運算
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def _new_pair(self, out_features):
        """A new (lora_A [r, in], lora_B [out, r]) pair, float32 even when the base is fp16/bf16."""
        w = self.base_layer.weight
        lora_A = nn.Linear(self.in_features, self.rank, bias=False, device=w.device, dtype=torch.float32)
        lora_B = nn.Linear(self.rank, out_features, bias=False, device=w.device, dtype=torch.float32)
        # A：Kaiming-uniform（a=√5，與 nn.Linear 預設相同）；B：全零 → 一開始 BA = 0，模型與原模型完全相同，
        # 但 A 不為零，所以 B 的梯度不為零，訓練能起步。
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        return lora_A, lora_B

    def _lora_path(self, x, lora_A, lora_B):
        """(..., in) -> (..., out_slice): dropout(x) @ A.T * scaling @ B.T, computed in float32."""
        x = self.lora_dropout(x.to(lora_A.weight.dtype))
        # scaling 乘在只有 r 寬的中間結果上（同一個數學式）：比乘在 out 寬的輸出上，forward、backward 各省一次全寬的乘法
        return lora_B(lora_A(x) * self.scaling)  # (..., in) @ (in, r) -> (..., r) · scaling @ (r, out) -> (..., out)

    def delta_weights(self):
        """Yield (output rows, ΔW = B @ A * scaling [rows, in]) — what merge() folds into W0."""
        raise NotImplementedError

    @torch.no_grad()
    def _add_to_base(self, sign):
        W = self.base_layer.weight
        for rows, delta in self.delta_weights():  # delta: [rows, in]
            if isinstance(self.base_layer, nn.Linear):
                W[rows] += sign * delta.to(W.dtype)  # Linear：W0 是 [out, in]
            else:
                W[:, rows] += sign * delta.T.to(W.dtype)  # Conv1D：W0 是 [in, out]，所以加 ΔWᵀ

    def merge(self):
        """W0 ← W0 + ΔW. Afterwards forward() is one plain matmul: inference costs nothing extra.
        Merging an already merged layer is a no-op (never a double add)."""
        if not self.merged:
            self._add_to_base(+1)
            self.merged = True

    def unmerge(self):
        """W0 ← W0 − ΔW (exact up to float rounding; in fp16/bf16 the rounding is visible)."""
        if self.merged:
            self._add_to_base(-1)
            self.merged = False


class LoRALinear(_LoRABase):
    """h = base_layer(x) + (α/r) · lora_B(lora_A(dropout(x)))  for an nn.Linear or a GPT-2 Conv1D."""

    def __init__(self, base_layer, rank, alpha, dropout=0.0, use_rslora=False):
        super().__init__(base_layer, rank, alpha, dropout, use_rslora)
        self.lora_A, self.lora_B = self._new_pair(self.out_features)

    def forward(self, x):  # x: (B, T, in)
        result = self.base_layer(x)  # 基礎輸出（凍結）(B, T, out)
        if self.merged:  # ΔW 已經併進 W0
            return result
        return result + self._lora_path(x, self.lora_A, self.lora_B).to(result.dtype)  # LoRA 路徑

    def delta_weights(self):
        yield slice(None), self.lora_B.weight @ self.lora_A.weight * self.scaling  # [out, r] @ [r, in]

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class LoRAFusedQKV(_LoRABase):
    """LoRA on chosen slices of a fused q|k|v projection (GPT-2's c_attn: 768 -> 2304 = [q | k | v]).

    Each chosen slice gets its own A [r, in] and B [d, r] (d = out/3), exactly like loralib's
    MergedLinear(enable_lora=[True, False, True]) used for GPT-2 in the LoRA paper (§7 / App. D).
    The slices not chosen (k for `q_proj v_proj`) are the frozen base output, untouched.
    """

    def __init__(self, base_layer, slices, rank, alpha, dropout=0.0, use_rslora=False):
        super().__init__(base_layer, rank, alpha, dropout, use_rslora)
        if self.out_features % 3:
            raise LoRAError(f"a fused q|k|v layer needs out_features divisible by 3, got {self.out_features}")
        self.slices = tuple(s for s in QKV if s in slices)  # 固定 q, k, v 順序
        self.slice_size = self.out_features // 3  # d = 768
        pairs = {s: self._new_pair(self.slice_size) for s in self.slices}
        self.lora_A = nn.ModuleDict({s: a for s, (a, _) in pairs.items()})  # 每個切片一組 A: [r, in]
        self.lora_B = nn.ModuleDict({s: b for s, (_, b) in pairs.items()})  # 每個切片一組 B: [d, r]

    def _rows(self, s):
        i = QKV.index(s)
        return slice(i * self.slice_size, (i + 1) * self.slice_size)

    def forward(self, x):  # x: (B, T, in)
        result = self.base_layer(x)  # 基礎輸出（凍結）(B, T, 3d)
        if self.merged:
            return result
        parts = list(result.split(self.slice_size, dim=-1))  # [q, k, v]，各 (B, T, d)，是 view 不複製
        for s in self.slices:  # 只在選定的切片加上 LoRA 路徑；不建立全寬的零張量
            i = QKV.index(s)
            parts[i] = parts[i] + self._lora_path(x, self.lora_A[s], self.lora_B[s]).to(result.dtype)
        return torch.cat(parts, dim=-1)  # (B, T, 3d)

    def delta_weights(self):
        for s in self.slices:
            yield self._rows(s), self.lora_B[s].weight @ self.lora_A[s].weight * self.scaling  # [d, in]

    def extra_repr(self):
        return f"slices={','.join(self.slices)}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


LORA_TYPES = (LoRALinear, LoRAFusedQKV)

# ---------------------------------------------------------------------------------------------------------------
# 注入：依名稱找出要包的層
# ---------------------------------------------------------------------------------------------------------------
LOGICAL_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
IN_BLOCK = re.compile(r"\.\d+\.")  # 「在 Transformer block 裡」= 名稱裡有層編號，如 transformer.h.3.attn.c_attn


def _layers(model):
    """{name: module} of every Linear / Conv1D that is not already part of a LoRA layer."""
    inside_lora = {n for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LAYER_TYPES) and not any(n.startswith(p + ".") for p in inside_lora)}


def _fused_qkv(layers):
    """Names of GPT-2 style fused q|k|v projections (`c_attn` with out = 3 x in)."""
    return [n for n, m in layers.items()
            if n.endswith("c_attn") and _in_out(m)[1] == 3 * _in_out(m)[0]]


def _matches(name, target):
    """peft's rule: the module's full name equals the target or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def resolve_targets(model, target_modules):
    """Map target names to {module name: None (whole layer) or tuple of q/k/v slices}.

    Accepted names: `all`; logical `q_proj k_proj v_proj o_proj` (on GPT-2: slices of attn.c_attn and attn.c_proj);
    real module names or dotted suffixes (`c_attn`, `mlp.c_proj`, `gate_proj` ...).
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    layers = _layers(model)
    fused = _fused_qkv(layers)
    if list(target_modules) == ["all"]:
        # 所有 block 內的 Linear/Conv1D；LM head 與 embedding 不在 block 內，永遠不包
        return {n: None for n in layers if IN_BLOCK.search(n)}
    plan = {}
    for target in target_modules:
        if target == "all":
            raise LoRAError("'all' cannot be combined with other target modules: pass --target_modules all alone")
        if fused and target in ("q_proj", "k_proj", "v_proj"):
            hits = fused  # GPT-2：q/k/v 是 c_attn 的切片
        elif fused and target == "o_proj":
            hits = [n for n in layers if n.endswith("attn.c_proj")]
        else:
            hits = [n for n in layers if _matches(n, target)]
        if not hits:
            raise LoRAError(f"target module '{target}' matches nothing in {type(model).__name__}; "
                            f"names that match here: {', '.join(target_candidates(model))}")
        for name in hits:
            if fused and target in ("q_proj", "k_proj", "v_proj"):
                if plan.get(name, ()) is None:
                    raise LoRAError(f"'{target}' and 'c_attn' both select {name}: choose slices or the whole c_attn")
                plan[name] = tuple(sorted(set(plan.get(name, ())) | {target[0]}, key=QKV.index))
            else:
                if plan.get(name):
                    raise LoRAError(f"'{target}' and q/k/v slices both select {name}: choose one")
                plan[name] = None
    return plan


def target_candidates(model):
    """The target names that match something in this model, for error messages and `utils.py inspect`."""
    layers = _layers(model)
    names = sorted({n.rsplit(".", 1)[-1] for n in layers if IN_BLOCK.search(n)})
    if _fused_qkv(layers):
        names = [*LOGICAL_NAMES, *names]
    return ["all", *names]


def _set_module(model, name, module):
    """Replace the submodule `name`; the new module takes over its train/eval mode (dropout!)."""
    parent, _, child = name.rpartition(".")
    module.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject_lora(model, target_modules, rank, alpha, dropout=0.0, use_rslora=False):
    """Freeze every base parameter, wrap the matching layers in place, return the wrapped names (sorted)."""
    _check_hparams(rank, alpha, dropout)
    if any(isinstance(m, LORA_TYPES) for m in model.modules()):
        raise LoRAError("this model already has LoRA layers: load a fresh base model before injecting again")
    plan = resolve_targets(model, target_modules)
    for p in model.parameters():  # 凍結整個預訓練模型；之後只有 lora_A / lora_B 會被訓練
        p.requires_grad_(False)
    for name, slices in plan.items():
        base = model.get_submodule(name)
        if slices is None:
            _set_module(model, name, LoRALinear(base, rank, alpha, dropout, use_rslora))
        else:
            _set_module(model, name, LoRAFusedQKV(base, slices, rank, alpha, dropout, use_rslora))
    return sorted(plan)


def lora_layers(model):
    """{name: LoRA layer} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def merge_lora(model):
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model):
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def lora_state_dict(model):
    """Only the LoRA weights, under this model's own names (e.g. `...c_attn.lora_A.q.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def count_parameters(model):
    """(trainable, total). Tied weights (GPT-2's lm_head = wte) count once, as in model.parameters()."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------------------------
# Adapter 檔案：PEFT 的磁碟格式，讓 peft.PeftModel.from_pretrained 直接讀得懂
# ---------------------------------------------------------------------------------------------------------------
def peft_tensors(name, layer):
    """PEFT tensors of one layer: (rank, alpha, {key: tensor}).

    q/v slices become ONE c_attn LoRA of rank n·r: A' = [A_q; A_v] ([n·r, in]) and a block-structured
    B' ([3d, n·r], zero rows for k), so B'A' = [B_q A_q; 0; B_v A_v]. alpha' keeps the scaling equal:
    n·α for α/r, √n·α for rsLoRA's α/√r.
    """
    key = PEFT_PREFIX + name
    if isinstance(layer, LoRALinear):
        tensors = {f"{key}.lora_A.weight": layer.lora_A.weight, f"{key}.lora_B.weight": layer.lora_B.weight}
        return layer.rank, layer.alpha, tensors
    n, r = len(layer.slices), layer.rank
    A = torch.cat([layer.lora_A[s].weight for s in layer.slices])  # [n·r, in]
    B = layer.lora_B[layer.slices[0]].weight.new_zeros(layer.out_features, n * r)  # [3d, n·r]
    for j, s in enumerate(layer.slices):
        B[layer._rows(s), j * r:(j + 1) * r] = layer.lora_B[s].weight  # 對角區塊
    alpha = layer.alpha * (math.sqrt(n) if layer.use_rslora else n)
    return n * r, alpha, {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}


def _target_list(model, wrapped):
    """The shortest dotted suffixes that select exactly the wrapped layers (`c_attn`, then `attn.c_proj`, ...)."""
    layers, wrapped = _layers(model) | dict.fromkeys(wrapped), set(wrapped)
    for k in range(1, max(n.count(".") for n in wrapped) + 2):
        suffixes = {".".join(n.split(".")[-k:]) for n in wrapped}
        if {n for n in layers if any(_matches(n, s) for s in suffixes)} == wrapped:
            return sorted(suffixes)
    return sorted(wrapped)


def atomic_write(path, write):
    """Write through a temporary file then rename, so a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_adapter(model, output_dir, base_model_name):
    """Write adapter_model.bin + adapter_config.json in PEFT's format. Returns the weights file's path."""
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA layers to save: call inject_lora first")
    state, ranks, alphas = {}, {}, {}
    for name, layer in layers.items():
        ranks[name], alphas[name], tensors = peft_tensors(name, layer)
        state.update({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})
    any_layer = next(iter(layers.values()))
    r, lora_alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": r, "lora_alpha": lora_alpha,
        # 與多數不同的層（例如 q,v 切片匯出成 2r 的 c_attn，旁邊還有 r 的 c_proj）寫進 pattern
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != lora_alpha},
        "target_modules": _target_list(model, layers),
        "lora_dropout": getattr(any_layer.lora_dropout, "p", 0.0),
        "fan_in_fan_out": any(not isinstance(m.base_layer, nn.Linear) for m in layers.values()),
        "bias": "none", "use_rslora": any_layer.use_rslora, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
    }
    os.makedirs(output_dir, exist_ok=True)
    weights_path = os.path.join(output_dir, ADAPTER_WEIGHTS)

    def write_weights(tmp):
        torch.save(state, tmp)
        reloaded = torch.load(tmp, map_location="cpu", weights_only=True)  # 存完重讀一次：絕不留下空的 adapter
        if len(reloaded) != len(state) or not state:
            raise OSError(f"adapter check failed: wrote {len(state)} tensors, read back {len(reloaded)}")

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)

    atomic_write(weights_path, write_weights)
    atomic_write(os.path.join(output_dir, ADAPTER_CONFIG), write_config)
    return weights_path


def _read_adapter(adapter_dir):
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise LoRAError(f"no {ADAPTER_CONFIG} in {adapter_dir}: point at a directory written by save_adapter or peft")
    with open(config_path) as f:
        config = json.load(f)
    bin_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    st_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(bin_path):
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    elif os.path.isfile(st_path):
        from safetensors.torch import load_file  # peft 的預設格式
        state = load_file(st_path)
    else:
        raise LoRAError(f"no {ADAPTER_WEIGHTS} (or adapter_model.safetensors) in {adapter_dir}")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{config_path}: peft_type is {config['peft_type']!r}, only LORA adapters can be loaded")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:  # peft 會把缺少的 lora_alpha 默默當成 8；我們不猜
            raise LoRAError(f"{config_path} has no '{key}': the adapter config is incomplete")
    for key in ("layers_to_transform", "modules_to_save"):
        if config.get(key):
            raise LoRAError(f"{config_path}: '{key}' is not supported by this implementation")
    return config, state


def _pattern(patterns, name, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches the module name or a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(model, adapter_dir):
    """Inject LoRA as described by `adapter_dir` (ours or peft's) and load its weights, strictly.

    q/v slices saved by save_adapter come back as the equivalent rank-2r c_attn LoRA (the same function).
    """
    config, state = _read_adapter(adapter_dir)
    targets = config["target_modules"]
    layers = _layers(model)
    if isinstance(targets, str):  # peft：字串代表 regex，要整個名稱都符合
        names = [n for n in layers if re.fullmatch(targets, n)]
    else:
        names = [n for n in layers if any(_matches(n, t) for t in targets)]
    expected = {PEFT_PREFIX + n + f".lora_{ab}.weight": n for n in names for ab in "AB"}
    where = f"adapter {adapter_dir} (for {config.get('base_model_name_or_path')}) on {type(model).__name__}"
    for key in state:
        if key not in expected:
            raise LoRAError(f"unexpected key {key} in {where}: the adapter was made for a different model")
    for key in expected:
        if key not in state:
            raise LoRAError(f"missing key {key} in {where}: the adapter file is incomplete or for another model")
    if any(isinstance(m, LORA_TYPES) for m in model.modules()):
        raise LoRAError("this model already has LoRA layers: load the adapter into a fresh base model")
    new_layers = {}  # 先全部建好、檢查完形狀，才動模型：出錯時模型保持原樣
    for name in names:
        rank = _pattern(config.get("rank_pattern"), name, config["r"])
        alpha = _pattern(config.get("alpha_pattern"), name, config["lora_alpha"])
        layer = LoRALinear(layers[name], rank, alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False))
        for ab in "AB":
            key, param = PEFT_PREFIX + name + f".lora_{ab}.weight", getattr(layer, f"lora_{ab}").weight
            if state[key].shape != param.shape:
                raise LoRAError(f"shape mismatch for {key}: file has {tuple(state[key].shape)}, "
                                f"{where} needs {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(state[key])
        new_layers[name] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers.items():
        _set_module(model, name, layer)
    return sorted(names)
