"""
train_lora_basic.py — 用手寫的 LoRA（lora_linear.py）微調因果語言模型，預設 GPT-2。

    python train_lora_basic.py --config config.yaml
    python train_lora_basic.py --model gpt2 --rank 8 --alpha 16 --epochs 3 --lr 2e-4

流程：設定 → 模型與 tokenizer → 資料（接成等長區塊）→ 基礎模型的驗證 loss → 注入 LoRA → 訓練迴圈 → 輸出
輸出（--output，預設 output/）：adapter_model.bin、adapter_config.json、training_loss_curve.png、
training_metrics.json、model_comparison.txt、training_log.txt、run_config.yaml；每個完成的 run 另在 results/ 留紀錄。
"""
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import get_scheduler

from config import Config, as_dict, load_config
from data import load_texts, make_blocks
from errors import UserError
from lora_linear import LoRAError, atomic_write, count_parameters, inject_lora, lora_state_dict, save_adapter
from models import fallback_banner, load_model_and_tokenizer
from utils import greedy_text, memory_breakdown, model_comparison_text, perplexity, plot_loss_curve

OUTPUT_FILES = ("adapter_model.bin", "adapter_config.json", "training_metrics.json", "checkpoint.pt")
CHECKPOINT = "checkpoint.pt"


class Diverged(Exception):
    pass


class Log:
    """print() that also keeps every line for training_log.txt; tqdm.write keeps the progress bar intact."""

    def __init__(self):
        self.lines, self.file = [], None

    def __call__(self, message=""):
        tqdm.write(message)
        self.lines.append(message)
        if self.file:
            self.file.write(message + "\n")
            self.file.flush()

    def open(self, path):
        self.file = open(path, "a", encoding="utf-8")
        self.file.write("\n".join(self.lines) + "\n")

    def close(self):
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------------------------- setup
def pick_device(cfg, log):
    """(device, autocast dtype or None). fp16 on CPU falls back to float32 with a notice."""
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = "cpu" if device == "auto" else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device} but no CUDA GPU is visible (torch.cuda.is_available() is False): "
                        "use --device auto or --device cpu")
    if cfg.fp16 and device == "cpu":
        log("NOTE: fp16 needs a CUDA GPU; training in float32 on CPU instead (--bf16 gives bfloat16 on CPU)")
        return device, None
    if cfg.bf16 and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support (it needs Ampere, e.g. RTX 30xx, or newer): use --fp16")
    return device, torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else None


def apply_cpu_budget(cfg, flags, log):
    """On CPU, cap steps / block length / accumulation / eval blocks by the cpu_* keys (smaller value wins).
    A value typed as a flag (e.g. --max_steps 200) is never capped: what you type wins."""
    changes = []
    caps = [("max_steps", cfg.cpu_max_steps), ("max_length", cfg.cpu_max_length),
            ("gradient_accumulation_steps", cfg.cpu_gradient_accumulation_steps),
            ("eval_max_blocks", cfg.cpu_eval_max_blocks)]
    for key, cap in caps:
        value = getattr(cfg, key)
        if key not in flags and cap is not None and (value is None or value > cap):
            setattr(cfg, key, cap)
            changes.append(f"{key} {value} -> {cap}")
    if changes:
        log(f"CPU budget (no GPU): {', '.join(changes)}. Set the cpu_* keys to null for the full recipe.")
    return changes


def prepare_output(cfg, log):
    """Make sure --output is writable *before* training; move an earlier run aside instead of overwriting it."""
    out = Path(cfg.output)
    if not cfg.resume and out.is_dir() and any((out / f).exists() for f in OUTPUT_FILES):
        backup = unused_path(out.with_name(f"{out.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}"))
        out.rename(backup)
        log(f"NOTE: {out}/ already held a run; moved it to {backup}/ (nothing is overwritten)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {out} is not writable ({e.strerror}): choose another --output") from None
    return out


# ----------------------------------------------------------------------------------------------- loss & eval
def lm_loss(model, x, amp):
    """Sum of next-token cross-entropy over a batch of blocks x (B, T) -> (loss_sum, number of predicted tokens)."""
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    # 位置 t 預測 t+1：logits[:, :-1] 對上 x[:, 1:]；在 float32 算 cross-entropy
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
    return loss, x[:, 1:].numel()


@torch.no_grad()
def evaluate(model, blocks, cfg, device, amp):
    """Validation loss (mean nats/token) from running sums — never holds all the logits."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), cfg.batch_size):
        loss, n = lm_loss(model, blocks[i:i + cfg.batch_size].to(device), amp)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / count


@torch.no_grad()
def sample(model, tokenizer, cfg):
    """Greedy continuation of cfg.sample_prompt (deterministic, so before/after are comparable)."""
    was_training = model.training
    model.eval()
    text = greedy_text(model, tokenizer, cfg.sample_prompt, cfg.sample_max_new_tokens)
    model.train(was_training)
    return text


# ----------------------------------------------------------------------------------------------- data order
def step_batches(train, step, steps_per_epoch, cfg):
    """The micro-batches of optimizer step `step`: a pure function of (seed, step), so a resumed run sees
    exactly the data the uninterrupted run would have seen."""
    epoch, s = divmod(step, steps_per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    idx = order[s * per_step:(s + 1) * per_step]
    return [train[idx[i:i + cfg.batch_size]] for i in range(0, len(idx), cfg.batch_size)]  # each (B, T)


# ----------------------------------------------------------------------------------------------- main job
def run(cfg, log, flags=frozenset()):
    start_time = time.time()
    if cfg.resume:
        cfg = resume_config(cfg.resume)
        log(f"Resuming {cfg.output}/ with its saved config")
    torch.manual_seed(cfg.seed)
    device, amp = pick_device(cfg, log)
    budget = apply_cpu_budget(cfg, flags, log) if device == "cpu" and not cfg.resume else []
    out = prepare_output(cfg, log)
    log.open(out / "training_log.txt")
    log("Config:\n" + yaml.safe_dump(as_dict(cfg), sort_keys=False, allow_unicode=True).rstrip())
    atomic_write(out / "run_config.yaml", lambda p: Path(p).write_text(yaml.safe_dump(as_dict(cfg), sort_keys=False)))

    # 1. 模型與資料 ------------------------------------------------------------------------------------------
    weight_dtype = amp if amp is not None else torch.float32  # 凍結的權重可以直接存成半精度
    model, tokenizer, info = load_model_and_tokenizer(cfg.model, cfg.offline_fallback, dtype=weight_dtype)
    if info.fallback_reason:
        log(fallback_banner(info))
    if info.max_positions and cfg.max_length > info.max_positions:
        raise UserError(f"max_length {cfg.max_length} exceeds {info.used}'s context of {info.max_positions} "
                        f"tokens: pass --max_length {min(info.max_positions, 1024)} or less")
    model.to(device)
    train, val = make_blocks(tokenizer, load_texts(cfg.dataset, cfg.dataset_config), cfg.max_length,
                             cfg.val_fraction, cfg.seed)  # (N, T), (M, T)
    val = val[:cfg.eval_max_blocks] if cfg.eval_max_blocks else val
    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    log(f"Model {info.used} ({info.source}) on {device}, autocast {amp or 'off'}; data {cfg.dataset}: "
        f"{len(train):,} train / {len(val):,} validation blocks of {cfg.max_length} tokens; {total_steps} steps of "
        f"{cfg.batch_size} x {cfg.gradient_accumulation_steps} x {cfg.max_length} = "
        f"{cfg.batch_size * cfg.gradient_accumulation_steps * cfg.max_length:,} tokens")

    # 2. 訓練前：基礎模型的驗證 loss 與生成樣本 -----------------------------------------------------------------
    base_val_loss = evaluate(model, val, cfg, device, amp)
    log(f"Base model validation loss {base_val_loss:.4f} (perplexity {perplexity(base_val_loss):.2f})")
    sample_before = sample(model, tokenizer, cfg)
    log(f"Sample before training: {cfg.sample_prompt!r} -> {sample_before!r}")

    # 3. 注入 LoRA：凍結全部，只訓練 lora_A / lora_B --------------------------------------------------------------
    wrapped = inject_lora(model, cfg.target_modules, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
    trainable, total = count_parameters(model)
    log(f"LoRA on {len(wrapped)} layers ({', '.join(cfg.target_modules)}): {trainable:,} trainable parameters, "
        f"{100 * trainable / (total - trainable):.3f}% of the base model's {total - trainable:,} "
        f"({(total - trainable) / trainable:,.0f}x fewer)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # 暖身 + 衰減：用 transformers 現成的排程
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp == torch.float16)  # fp16 才需要 loss scaling

    metrics = {"status": "running", "model": vars(info), "device": device, "autocast": str(amp),
               "config": as_dict(cfg), "cpu_budget": budget, "wrapped_modules": wrapped,
               "data": {"dataset": cfg.dataset, "train_blocks": len(train), "val_blocks": len(val),
                        "block_tokens": cfg.max_length},
               "parameters": {"trainable": trainable, "total": total, "ratio": (total - trainable) / trainable},
               "base_val_loss": base_val_loss, "base_val_perplexity": perplexity(base_val_loss),
               "train_loss": [], "eval": [], "steps_done": 0, "total_steps": total_steps, "tokens_seen": 0,
               "train_time_s": 0.0, "samples": {"before": sample_before}}
    if cfg.resume:
        metrics = load_checkpoint(out, model, optimizer, scheduler, scaler, metrics)
        log(f"Resumed at step {metrics['steps_done']}/{total_steps}")

    writer = SummaryWriter(os.path.join(cfg.logdir, out.name))
    progress = {"rng": torch.get_rng_state()}  # 每一步開始時的亂數狀態：中斷後從這一步重來
    try:
        train_loop(model, params, optimizer, scheduler, scaler, train, val, steps_per_epoch, cfg, device, amp,
                   metrics, progress, writer, out, log)
    except Diverged as e:
        last = metrics["eval"][-1]["step"] if metrics["eval"] else None
        kept = f"the adapter from step {last} is kept in {out}/" if last else "no adapter was saved yet"
        raise UserError(f"the loss became NaN/inf at {e}: lower --lr (e.g. 1e-4), or use --bf16 instead of --fp16; "
                        f"{kept}") from None
    except KeyboardInterrupt:
        metrics["status"] = "interrupted"
        save_checkpoint(out, model, optimizer, scheduler, scaler, metrics, progress["rng"])
        save_adapter(model, out, info.used)
        write_reports(model, metrics, out, weight_dtype, device)
        log(f"Interrupted at step {metrics['steps_done']}/{total_steps}: adapter and metrics saved in {out}/; "
            f"continue with: python train_lora_basic.py --resume {out}")
        raise
    finally:
        writer.close()

    # 4. 訓練後 ---------------------------------------------------------------------------------------------
    metrics["status"] = "finished"
    metrics["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    metrics["samples"]["after"] = sample(model, tokenizer, cfg)
    log(f"Sample after training:  {cfg.sample_prompt!r} -> {metrics['samples']['after']!r}")
    save_adapter(model, out, info.used)
    metrics["wall_time_s"] = time.time() - start_time
    write_reports(model, metrics, out, weight_dtype, device)
    (out / CHECKPOINT).unlink(missing_ok=True)  # 完成的 run 不需要續跑用的檔案
    record = write_results_record(metrics, cfg)
    final = metrics["eval"][-1]
    log(f"Done in {metrics['wall_time_s']:.0f} s: validation loss {base_val_loss:.4f} -> {final['val_loss']:.4f} "
        f"(perplexity {metrics['base_val_perplexity']:.2f} -> {final['val_perplexity']:.2f}); "
        f"outputs in {out}/, run record {record}")
    return metrics


def train_loop(model, params, optimizer, scheduler, scaler, train, val, steps_per_epoch, cfg, device, amp, metrics,
               progress, writer, out, log):
    model.train()
    bar = tqdm(total=metrics["total_steps"], initial=metrics["steps_done"], desc="train", unit="step",
               dynamic_ncols=True, mininterval=1.0)
    for step in range(metrics["steps_done"], metrics["total_steps"]):
        t0 = time.time()
        progress["rng"] = torch.get_rng_state()
        batches = step_batches(train, step, steps_per_epoch, cfg)
        n_tokens = sum(b[:, 1:].numel() for b in batches)  # 這一步要預測的 token 總數
        step_loss = 0.0
        for x in batches:  # 梯度累積：每個 micro-batch 的 loss 總和 / 整步的 token 數 → 等同一個大 batch
            loss_sum, _ = lm_loss(model, x.to(device), amp)
            scaler.scale(loss_sum / n_tokens).backward()
            step_loss += loss_sum.item()
        step_loss /= n_tokens
        if not math.isfinite(step_loss):
            raise Diverged(f"step {step + 1}")
        scaler.unscale_(optimizer)  # 先還原梯度的真實大小，裁剪才有意義
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        dt = time.time() - t0
        metrics["steps_done"] = step + 1
        metrics["tokens_seen"] += sum(b.numel() for b in batches)
        metrics["train_time_s"] += dt
        metrics["train_loss"].append({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm})
        tokens_per_sec = metrics["tokens_seen"] / metrics["train_time_s"]
        for name, value in (("train/loss", step_loss), ("lr", lr), ("grad_norm", grad_norm),
                            ("tokens_per_sec", tokens_per_sec)):
            writer.add_scalar(name, value, step + 1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:.0f}")
        bar.update(1)

        if (step + 1) % cfg.eval_steps == 0 or step + 1 == metrics["total_steps"]:
            val_loss = evaluate(model, val, cfg, device, amp)
            metrics["eval"].append({"step": step + 1, "val_loss": val_loss, "val_perplexity": perplexity(val_loss)})
            writer.add_scalar("val/loss", val_loss, step + 1)
            writer.add_scalar("val/perplexity", perplexity(val_loss), step + 1)
            log(f"step {step + 1}/{metrics['total_steps']}: train loss {step_loss:.4f}, validation loss "
                f"{val_loss:.4f} (perplexity {perplexity(val_loss):.2f}), {tokens_per_sec:.0f} tokens/s")
            if step + 1 < metrics["total_steps"]:  # 中途存檔：發散或當機時，最後一個好的 adapter 還在
                save_adapter(model, out, metrics["model"]["used"])
                save_checkpoint(out, model, optimizer, scheduler, scaler, metrics, torch.get_rng_state())
    bar.close()


# ----------------------------------------------------------------------------------------------- files
def save_checkpoint(out, model, optimizer, scheduler, scaler, metrics, rng):
    """Everything --resume needs: LoRA weights, optimizer, scheduler, scaler, RNG, counters (data order is
    a function of the step, see step_batches)."""
    state = {"lora": lora_state_dict(model), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "metrics": metrics,
             "rng": rng,
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    atomic_write(out / CHECKPOINT, lambda p: torch.save(state, p))


def resume_config(path):
    ckpt = Path(path) / CHECKPOINT
    if not ckpt.is_file():
        raise UserError(f"nothing to resume in {path}: no {CHECKPOINT} there (it is written at each evaluation and "
                        "on Ctrl-C, and removed when a run finishes)")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["metrics"]["config"]
    return Config(**(saved | {"resume": str(path), "output": str(path)}))


def load_checkpoint(out, model, optimizer, scheduler, scaler, metrics):
    state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    model.load_state_dict(state["lora"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["metrics"] | {"samples": metrics["samples"] | {"before": state["metrics"]["samples"]["before"]}}


def peak_memory(device):
    if device.startswith("cuda"):
        return "CUDA max_memory_allocated", torch.cuda.max_memory_allocated()
    return "CPU process peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def write_reports(model, metrics, out, weight_dtype, device):
    """training_metrics.json, model_comparison.txt and training_loss_curve.png from the metrics so far."""
    if metrics["eval"]:
        metrics["final_val_loss"] = metrics["eval"][-1]["val_loss"]
        metrics["final_val_perplexity"] = metrics["eval"][-1]["val_perplexity"]
    metrics["tokens_per_sec"] = metrics["tokens_seen"] / max(metrics["train_time_s"], 1e-9)
    metrics["adapter_bytes"] = (out / "adapter_model.bin").stat().st_size
    kind, measured = peak_memory(device)
    trainable, total = metrics["parameters"]["trainable"], metrics["parameters"]["total"]
    metrics["memory"] = {"computed": memory_breakdown(total, trainable, torch.finfo(weight_dtype).bits // 8),
                         "weight_dtype": str(weight_dtype).replace("torch.", ""),
                         "measured_kind": kind, "measured_bytes": measured}
    atomic_write(out / "training_metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=2)))
    atomic_write(out / "model_comparison.txt", lambda p: Path(p).write_text(model_comparison_text(metrics)))
    plot_loss_curve(metrics, out / "training_loss_curve.png")


def unused_path(path):
    """`path`, or `path-1`, `path-2` ... if it exists (two runs can finish within the same second)."""
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return candidate


def write_results_record(metrics, cfg):
    """results/<time>_<output name>.json: one record per finished run, never overwritten (for utils.py compare)."""
    results = Path(cfg.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    path = unused_path(results / f"{time.strftime('%Y%m%d-%H%M%S')}_{Path(cfg.output).name}.json")
    record = metrics | {"output_dir": str(Path(cfg.output).resolve())}
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(record, indent=2)))
    return path


def main(argv=None):
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    log = Log()
    try:
        cfg, flags = load_config(argv)
        run(cfg, log, flags)
    except (UserError, LoRAError) as e:
        if debug:
            raise
        sys.exit(f"error: {e}")
    except torch.OutOfMemoryError:
        if debug:
            raise
        sys.exit("error: CUDA out of memory: use a smaller --batch_size with more --gradient_accumulation_steps "
                 "(same tokens per step), a shorter --max_length, --fp16/--bf16, or a smaller --model such as "
                 "distilgpt2")
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        log.close()


if __name__ == "__main__":
    main()
