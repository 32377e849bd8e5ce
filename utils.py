"""utils.py — 分析與報告：參數/記憶體計算、loss 曲線圖、model_comparison.txt，以及課程用的子命令：

    python utils.py compare_ranks --results_dir ./results       # 實驗 1：各 rank 的表格 + 圖（= compare --by rank）
    python utils.py compare --by alpha --results_dir ./results  # 實驗 2、3：--by alpha / target_modules / lr ...
    python utils.py inspect --model gpt2 --target_modules q_proj v_proj --rank 8 --random_init
                                                                # 不訓練：會包哪些層、多少參數、省多少記憶體
    python utils.py generate --adapter output/ --prompt "Q: ..." [--merge | --no_adapter]
                                                                # 用訓練好的 adapter 生成文字（greedy）

比較多次 run 的程式在 compare.py；子命令都在本檔最下方（build_parser / main）。
torch、transformers 只在需要時才 import：`python utils.py --help` 與 compare 不必載入它們。
"""
import argparse
import difflib
import json
import math
import re
import sys
from pathlib import Path

from errors import UserError

MiB = 1024 ** 2  # 本專案的記憶體與檔案大小都以 MiB（2^20 bytes）為單位
ADAMW_STATES = 2  # AdamW 每個可訓練參數存兩個狀態：一階動量 m、二階動量 v


def memory_breakdown(total_params, trainable_params, weight_bytes=4):
    """Bytes for weights, gradients and AdamW states: full fine-tuning vs LoRA (activations not included).

    full FT : every parameter has an fp32 weight, an fp32 gradient and two fp32 AdamW states = 16 bytes/param
    LoRA    : the frozen base only stores its weights (weight_bytes each: 4 fp32, 2 fp16/bf16);
              the LoRA parameters (fp32) pay the 16 bytes/param
    """
    base = total_params - trainable_params
    full = {"weights": 4 * base, "gradients": 4 * base, "optimizer": 4 * ADAMW_STATES * base}
    lora = {"weights": weight_bytes * base + 4 * trainable_params, "gradients": 4 * trainable_params,
            "optimizer": 4 * ADAMW_STATES * trainable_params}
    full["total"], lora["total"] = sum(full.values()), sum(lora.values())
    return {"full_finetune": full, "lora": lora, "ratio": full["total"] / lora["total"]}


def model_comparison_text(metrics):
    """The human-readable model_comparison.txt of one run (all numbers from `metrics`)."""
    p, mem = metrics["parameters"], metrics["memory"]
    trainable, total = p["trainable"], p["total"]
    base = total - trainable
    lines = [
        f"Model: {metrics['model']['used']}" + (f"  (requested {metrics['model']['requested']}; "
                                                f"{metrics['model']['fallback_reason']})"
                                                if metrics["model"]["fallback_reason"] else ""),
        f"LoRA: r={metrics['config']['rank']}, alpha={metrics['config']['alpha']:g}, "
        f"targets={' '.join(metrics['config']['target_modules'])}, {len(metrics['wrapped_modules'])} layers wrapped",
        "",
        "Parameters",
        f"  base model (frozen)      {base:>15,}",
        f"  LoRA (trainable)         {trainable:>15,}   {100 * trainable / base:.3f}% of the base model",
        f"  reduction                {base / trainable:>15,.1f}x fewer trainable parameters",
        "",
        "Files",
        f"  adapter_model.bin        {metrics['adapter_bytes'] / MiB:>12.2f} MiB",
        f"  full fp32 checkpoint     {4 * base / MiB:>12.2f} MiB   ({4 * base / metrics['adapter_bytes']:,.0f}x larger)",
        "",
        *memory_table_lines(mem["computed"], mem["weight_dtype"]),
        "",
        f"Measured peak memory of this run ({mem['measured_kind']}, model loading included): {mem['measured_bytes'] / MiB:,.0f} MiB",
    ]
    return "\n".join(lines) + "\n"


def memory_table_lines(computed, weight_dtype):
    """The full fine-tune vs LoRA memory table (a memory_breakdown() result), as lines of text."""
    lines = [f"Training memory, computed (weights + gradients + AdamW m and v; activations excluded; "
             f"frozen weights in {weight_dtype})",
             f"  {'':24} {'full fine-tune':>15} {'LoRA':>12}"]
    full, lora = computed["full_finetune"], computed["lora"]
    for key in ("weights", "gradients", "optimizer", "total"):
        lines.append(f"  {key:24} {full[key] / MiB:>11.1f} MiB {lora[key] / MiB:>8.1f} MiB")
    lines.append(f"  {'ratio':24} {computed['ratio']:>15.2f}x")
    return lines


def ema(values, beta=0.9):
    """Exponential moving average (bias-corrected), to read a noisy loss curve at a glance."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def plot_loss_curve(metrics, path):
    """Train loss per optimizer step (raw + smoothed), validation loss at each eval, the base model's as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in metrics["train_loss"]]
    losses = [r["loss"] for r in metrics["train_loss"]]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if losses:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss (per step)")
        ax.plot(steps, ema(losses), color="tab:blue", lw=2, label="train loss (smoothed)")
    evals = [{"step": 0, "val_loss": metrics["base_val_loss"]}, *metrics["eval"]]  # step 0 = 基礎模型
    ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="tab:orange", lw=2,
            label="validation loss")
    ax.axhline(metrics["base_val_loss"], color="gray", ls="--", lw=1,
               label=f"base model validation loss ({metrics['base_val_loss']:.3f})")
    c = metrics["config"]
    ax.set_title(f"LoRA on {metrics['model']['used']}: r={c['rank']}, alpha={c['alpha']:g}, "
                 f"{' '.join(c['target_modules'])} — {metrics['data']['dataset']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def perplexity(loss):
    return math.exp(min(loss, 50.0))  # exp(50) 已經遠超過任何詞彙量；避免 overflow


# ----------------------------------------------------------------------------------------------- inspect
def random_init_config(name):
    """The architecture (a transformers config) of `name` without downloading weights."""
    from transformers import AutoConfig, GPT2Config

    import models

    if name == "gpt2":
        return GPT2Config()  # GPT2Config() 的預設值就是 GPT-2 124M：12 層、768 維、12 頭、vocab 50,257
    if name.lower() == models.BUNDLED_MODEL:  # 內附的 GGUF 檔裡就有架構資訊
        return AutoConfig.from_pretrained(models.bundled_folder(), gguf_file=models.BUNDLED_GGUF)
    try:  # 本機資料夾的 config.json，或 Hugging Face 快取裡的（local_files_only：絕不連網）
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        raise UserError(f"--random_init needs the architecture of '{name}': it is not a local folder with config.json "
                        "and its config is not in the Hugging Face cache (only gpt2 is built in); pass a local "
                        "folder, --model gpt2, or drop --random_init to load the real model") from None


def build_model(name, random_init):
    """(model, one-line description). With random_init: shapes only, on PyTorch's 'meta' device."""
    import torch
    from transformers import AutoModelForCausalLM

    from models import load_model_and_tokenizer

    if random_init:
        config = random_init_config(name)
        # meta 裝置上的張量只有形狀、沒有資料：124M 參數的 GPT-2 瞬間建好、不佔記憶體。數參數量只需要形狀。
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return model, f"{name} (random init from {type(config).__name__}, shapes only: nothing downloaded)"
    try:  # offline_fallback=None：要數的是 *這個* 模型，不能默默換成別的
        model, _, info = load_model_and_tokenizer(name, offline_fallback=None)
    except UserError as e:
        raise UserError(f"{e}; or add --random_init to count from the architecture alone") from None
    return model, f"{info.used} ({info.source})"


def adapter_file_bytes(model):
    """Bytes of tensor data in adapter_model.bin as save_adapter would write it (PEFT format, float32).

    GPT-2's q/v slices are exported as ONE c_attn LoRA of rank 2r whose B has zero rows for k, so the file holds
    more numbers than there are trainable parameters (see lora_linear.peft_tensors)."""
    from lora_linear import peft_tensors, lora_layers

    total = 0
    for name, layer in lora_layers(model).items():
        _, _, tensors = peft_tensors(name, layer)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    return total


def layer_description(layer):
    """(base layer kind, 'in -> out', LoRA shapes) of one LoRA layer, e.g. ('Conv1D', '768 -> 2304', 'q,v: ...')."""
    from lora_linear import LoRAFusedQKV

    kind = type(layer.base_layer).__name__
    shape = f"{layer.in_features} -> {layer.out_features}"
    r = layer.rank
    if isinstance(layer, LoRAFusedQKV):  # 每個切片各一組 A [r, in]、B [d, r]
        d = layer.slice_size
        return kind, shape, f"{','.join(layer.slices)} slices, each A {r}x{layer.in_features} + B {d}x{r}"
    return kind, shape, f"A {r}x{layer.in_features} + B {layer.out_features}x{r}"


def inspect(args, out=print):
    """List the layers inject_lora would wrap and the parameter / file / memory arithmetic — without training."""
    from lora_linear import LoRAError, count_parameters, inject_lora, lora_layers, target_candidates

    model, where = build_model(args.model, args.random_init)
    _, base_total = count_parameters(model)
    candidates = target_candidates(model)  # 注入前問：包過的層就不再是候選
    try:
        inject_lora(model, args.target_modules, args.rank, args.alpha)
    except LoRAError as e:
        raise UserError(str(e)) from None
    trainable, total = count_parameters(model)  # total = 原模型 + LoRA
    layers = lora_layers(model)

    out(f"Model: {where}, {type(model).__name__}")
    out(f"LoRA: r={args.rank}, alpha={args.alpha:g} (scaling alpha/r = {args.alpha / args.rank:g}), "
        f"targets {' '.join(args.target_modules)} -> {len(layers)} layers")
    out(f"Target names this model accepts: {' '.join(candidates)}")
    out("")
    rows = [(name, *layer_description(layer), f"{sum(p.numel() for p in layer.parameters() if p.requires_grad):,}")
            for name, layer in layers.items()]
    header = ("module", "base layer", "in -> out", "LoRA matrices", "LoRA params")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        out("  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())

    # 課程的數字：GPT-2 124M、q,v、r=8 → 12 層 × 2 個切片 × (8×768 + 768×8) = 294,912；124,439,808 / 294,912 ≈ 422
    file_bytes = adapter_file_bytes(model)
    out("")
    out("Totals")
    out(f"  base model parameters (frozen) {base_total:>15,}")
    out(f"  LoRA parameters (trainable)    {trainable:>15,}   {100 * trainable / base_total:.3f}% of the base model")
    out(f"  total with LoRA                {total:>15,}")
    out(f"  => {trainable:,} trainable of {base_total:,} parameters: {base_total / trainable:,.1f}x fewer than "
        "full fine-tuning")
    out(f"  adapter_model.bin              {file_bytes / MiB:>12.2f} MiB   (float32 tensors in PEFT format"
        + (f"; {file_bytes // 4:,} numbers: the q/k/v slices of each c_attn are stored as ONE c_attn LoRA of "
           "rank r x slices, with zero rows for the slices not chosen)" if file_bytes != 4 * trainable else ")"))
    out(f"  full fp32 checkpoint           {4 * base_total / MiB:>12.2f} MiB   "
        f"({4 * base_total / file_bytes:,.0f}x the adapter)")
    out("")
    weight_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[args.weight_dtype]
    for line in memory_table_lines(memory_breakdown(total, trainable, weight_bytes), args.weight_dtype):
        out(line)
    return {"trainable": trainable, "base_total": base_total, "layers": list(layers), "adapter_bytes": file_bytes}


# ----------------------------------------------------------------------------------------------- generate
def greedy_text(model, tokenizer, prompt, max_new_tokens):
    """Greedy continuation of prompt (deterministic: the same model gives the same text)."""
    import torch

    from models import generation_pad_id

    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=generation_pad_id(tokenizer))
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def greedy(model, tokenizer, prompt, max_new_tokens):
    """greedy_text plus the prompt's logits (T, V), to show how much merging changes them."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(**enc).logits[0].float().cpu()  # (T, V)：合併前後比一比，看差多少
    return greedy_text(model, tokenizer, prompt, max_new_tokens), logits


def adapter_summary(adapter_dir, adapter_config):
    """'r=8, alpha=16, q_proj v_proj' as the run was trained (from its training_metrics.json when present).

    The PEFT file alone can mislead: GPT-2's q/v slices at r=8, alpha=16 are stored as one c_attn LoRA with
    r=16, lora_alpha=32 (the same function, see lora_linear.peft_tensors)."""
    stored = f"r={adapter_config['r']}, lora_alpha={adapter_config['lora_alpha']:g}"
    try:
        c = json.loads((Path(adapter_dir) / "training_metrics.json").read_text(encoding="utf-8"))["config"]
        trained = f"r={c['rank']}, alpha={c['alpha']:g}, targets {' '.join(c['target_modules'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{stored}, targets {' '.join(adapter_config['target_modules'])}"
    return trained if f"r={c['rank']}, lora_alpha={c['alpha']:g}" == stored else f"{trained} (stored as {stored})"


def generate(args, out=print):
    """Load the adapter's base model + the adapter, generate greedily; --merge shows merging changes nothing."""
    import torch

    from lora_linear import ADAPTER_CONFIG, LoRAError, load_adapter, merge_lora
    from models import load_model_and_tokenizer

    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.merge and args.no_adapter:
        raise UserError("--merge and --no_adapter exclude each other: there is no adapter to merge")
    config_path = Path(args.adapter) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserError(f"no {ADAPTER_CONFIG} in {args.adapter}: pass the --output folder of a training run, "
                        "e.g. --adapter output/")
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e}): re-save the adapter") from None
    base = args.model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_path} names no base_model_name_or_path: pass --model")
    try:  # offline_fallback=None：adapter 只配它自己的基礎模型，換成別的模型只會得到錯的結果
        model, tokenizer, info = load_model_and_tokenizer(base, offline_fallback=None)
    except UserError as e:  # 例如 Hub 連不上：說清楚，絕不默默換成內附模型
        raise UserError(f"base model '{base}' unavailable, and generate never swaps in another model "
                        f"(pass --model <folder> if it lives elsewhere): {e}") from None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} but no CUDA GPU is visible: use --device cpu")
    model.to(device)
    out(f"Base model: {info.used} ({info.source})" + (" [--model overrides the adapter's base]" if args.model else ""))
    if args.no_adapter:
        text, _ = greedy(model, tokenizer, args.prompt, args.max_new_tokens)
        out("--- base model, no adapter ---")
        out(args.prompt + text)
        return {"base": text}
    try:
        wrapped = load_adapter(model, args.adapter)
    except LoRAError as e:
        raise UserError(str(e)) from None
    out(f"Adapter: {args.adapter}: {adapter_summary(args.adapter, adapter_config)}, {len(wrapped)} layers")
    text, logits = greedy(model, tokenizer, args.prompt, args.max_new_tokens)
    out("--- with the adapter: W0 x + (alpha/r) B A x ---")
    out(args.prompt + text)
    result = {"adapter": text}
    if args.merge:
        merge_lora(model)  # W0 <- W0 + (alpha/r) B A：之後每一層只剩一次矩陣乘法
        merged_text, merged_logits = greedy(model, tokenizer, args.prompt, args.max_new_tokens)
        out("--- adapter merged into the weights: (W0 + (alpha/r) B A) x ---")
        out(args.prompt + merged_text)
        gap = (logits - merged_logits).abs().max().item()
        if merged_text == text:
            out(f"Merged and unmerged text are identical (largest logit difference on the prompt: {gap:.2e}).")
        else:  # 合併多了一次浮點捨入；幾乎平手的 token 偶爾會翻轉
            out(f"NOTE: merged and unmerged text differ (largest logit difference on the prompt: {gap:.2e}): "
                "merging rounds W0 + BA once more, which can flip a near-tie in greedy decoding.")
        result["merged"] = merged_text
    return result


# ----------------------------------------------------------------------------------------------- command line
def run_compare(args):
    from compare import compare  # compare.py 用到本檔的 ema、MiB：在這裡才 import，避免循環 import

    compare(args.results_dir, args.by)


COMMANDS = ("compare_ranks", "compare", "inspect", "generate")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse 預設印出整段 usage 再結束；我們只給一行，並猜使用者想打的子命令
        unknown = re.match(r"argument <sub-command>: invalid choice: '(.*?)'", message)
        if unknown:
            close = difflib.get_close_matches(unknown.group(1), COMMANDS, n=1)
            message = f"unknown sub-command '{unknown.group(1)}': " + (
                f"did you mean {close[0]}?" if close else f"choose one of {', '.join(COMMANDS)}")
        raise UserError(f"{message} (see python {self.prog} --help)")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    parser = _Parser(prog="utils.py", description="LoRA course tools: compare runs, inspect a model, generate text.")
    sub = parser.add_subparsers(dest="command", metavar="<sub-command>", required=True)

    def results_dir(p):
        p.add_argument("--results_dir", default="results", help="folder of run records (default: results)")

    p = sub.add_parser("compare_ranks", parents=[common], help="compare the runs of a rank sweep (= compare --by rank)",
                       description="Table + results_dir/compare_rank.{md,png} of the runs that differ only in rank.")
    results_dir(p)
    p.set_defaults(by="rank")
    p = sub.add_parser("compare", parents=[common], help="compare runs that differ only in one setting",
                       description="Table + results_dir/compare_<key>.{md,png} of the runs that differ only in --by. "
                                   "Runs that differ in other settings too are listed, not mixed in.")
    p.add_argument("--by", required=True, help="the config key to compare: rank, alpha, target_modules, lr, ...")
    results_dir(p)
    for p in (sub.choices["compare_ranks"], sub.choices["compare"]):
        p.set_defaults(func=run_compare)

    p = sub.add_parser("inspect", parents=[common], help="which layers LoRA wraps, parameters and memory (no training)",
                       description="List every module inject_lora would wrap and the parameter/file/memory totals.")
    p.add_argument("--model", default="gpt2", help="Hub id, local folder, or smollm2-135m (default: gpt2)")
    p.add_argument("--target_modules", nargs="+", default=["q_proj", "v_proj"], help="default: q_proj v_proj")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--random_init", action="store_true",
                   help="build the architecture from its config only (gpt2 built in; no download, no weights)")
    p.add_argument("--weight_dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the frozen weights in the memory arithmetic (default: float32)")
    p.set_defaults(func=inspect)

    p = sub.add_parser("generate", parents=[common], help="generate text with a trained adapter (greedy)",
                       description="Load the adapter's base model (base_model_name_or_path) + the adapter, "
                                   "generate greedily.")
    p.add_argument("--adapter", default="output", help="folder with adapter_config.json (default: output)")
    p.add_argument("--prompt", default="Q: What is the secret of a happy life?\nA:")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--merge", action="store_true", help="also merge the adapter into the weights: same text")
    p.add_argument("--no_adapter", action="store_true", help="the base model alone, for comparison")
    p.add_argument("--model", help="load this base model instead of the adapter's base_model_name_or_path")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=generate)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        if "--debug" in argv:
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
