"""
compare.py — 把 results/ 裡多次訓練的紀錄排成一張表、一張圖：rank、alpha、target_modules ... 一眼比較。

    python utils.py compare_ranks --results_dir ./results          # = compare --by rank
    python utils.py compare --by alpha --results_dir ./results
    python utils.py compare --by target_modules --results_dir ./results

每個完成的 run 都會寫一筆 results/<時間>_<output 名稱>.json（train_lora_basic.py 的 write_results_record），
內容 = 它完整的 training_metrics.json + output_dir。同一個 results/ 會裝著「所有」實驗的紀錄：rank 掃描、
alpha 掃描、target_modules 比較 …… 所以比較 rank 時，只能拿「除了 rank 以外設定都相同」的 runs 來比：

    1. 每筆紀錄取出「會影響結果的設定」（settings）；不影響結果的 key 見 IGNORED_KEYS
    2. 依「除了被比較的 key 以外的所有設定」分組；取不同值最多的一組來比較（同樣多時取最新的那組）
    3. 組內同一個值跑了好幾次：顯示最新的一筆，並註明
    4. 其他組的 runs 不混進來：逐筆列出，並說明它和被比較的那組差在哪些 key

輸出：終端機的表格、results/compare_<key>.md（同一張表，課程文件可以直接引用）、results/compare_<key>.png。
"""
import difflib
import json
import os
import re
import sys
from pathlib import Path

from errors import UserError
from utils import MiB, ema

# 這些 key 不改變「學到什麼、量到什麼」，分組時忽略：
IGNORED_KEYS = {
    "output", "logdir", "results_dir", "resume",  # 檔案放在哪裡
    "device",  # 同一個實驗在 CPU 或 GPU 上跑，結果相同（只有速度不同，訓練時間一欄會看得出來）
    "offline_fallback",  # 實際用了哪個模型，看 model（= 紀錄裡的 model.used，見 settings）
    "sample_prompt", "sample_max_new_tokens",  # 只影響訓練前後那段生成範例
    "eval_steps",  # 只決定多久評估一次；評估不碰亂數，最後一步一定會評估，所以最終的驗證 loss 不變
    # CPU 預算本身不算：它生效後的值已經寫回 max_steps、max_length 等 key（紀錄裡存的是生效的值）
    "cpu_max_steps", "cpu_max_length", "cpu_gradient_accumulation_steps", "cpu_eval_max_blocks",
}
# 注意 seed「算」：它決定 lora_A 的初始值，也決定哪些文章被分到驗證集 —— seed 不同，驗證 loss 就不能直接比。

# 表格上方「這些 runs 共同的設定」只列這幾個（全部 30 多個 key 太長；完整設定在每筆紀錄的 config 裡）
HEADLINE_KEYS = ("model", "dataset", "target_modules", "rank", "alpha", "dropout", "lr", "max_steps", "epochs",
                 "batch_size", "gradient_accumulation_steps", "max_length", "seed")
RECORD_NAME = re.compile(r"^(\d{8}-\d{6})_")  # results/20261128-234911_rank_2.json


# ----------------------------------------------------------------------------------------------- 讀取紀錄
def load_records(results_dir):
    """Every run record in results_dir (top level *.json), oldest first. Files that are not run records are skipped
    with a note on stderr; a missing or empty directory is a UserError."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise UserError(f"results directory not found: {folder}: run train_lora_basic.py first (each finished run "
                        "writes a record there), or pass --results_dir")
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            ok = (isinstance(record, dict) and record.get("status", "finished") == "finished" and record.get("eval")
                  and all(k in record for k in ("config", "parameters", "base_val_loss", "train_loss")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            print(f"note: skipped {path.name}: not a finished run record", file=sys.stderr)
            continue
        record["_file"] = path
        records.append(record)
    if not records:
        raise UserError(f"no run records (*.json) in {folder}: train first, e.g. for rank in 2 4 8 16 32; "
                        "do python train_lora_basic.py --rank $rank --output rank_${rank}; done")
    # 新舊順序：檔名開頭的時間（到秒），同一秒內再看檔案修改時間
    records.sort(key=lambda r: (_record_time(r["_file"]), r["_file"].stat().st_mtime_ns))
    return records


def _record_time(path):
    match = RECORD_NAME.match(path.name)
    return match.group(1) if match else ""


def settings(record):
    """{key: value} of the config keys that define the experiment. `model` is the model actually used (after an
    offline fallback the config says gpt2 but the numbers are SmolLM2's); lists become tuples (hashable)."""
    config = dict(record["config"])
    config["model"] = record.get("model", {}).get("used", config.get("model"))
    if config.get("max_steps") is not None:
        config.pop("epochs", None)  # 設了 max_steps 時 epochs 不起作用
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k not in IGNORED_KEYS}


def show(value):
    """A setting as the course writes it on the command line: 16.0 -> 16, ('q_proj', 'v_proj') -> q_proj v_proj."""
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value)


# ----------------------------------------------------------------------------------------------- 分組
def group_runs(records, key):
    """Split the records into the runs to compare and the rest.

    Returns a dict:
      shown       the newest run of each value of `key` in the chosen group, sorted by that value
      older       {value: [older runs with the same value]} in the chosen group (not shown)
      flagged     [(run, {other key: (its value, the chosen group's value)})] for every run outside the group
      common      the settings (other than `key`) shared by the chosen group
    """
    known = sorted({k for r in records for k in settings(r)} | set(IGNORED_KEYS))
    if not any(key in settings(r) or key in r["config"] for r in records):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f": did you mean '{close[0]}'?" if close else f"; keys: {', '.join(known)}"
        raise UserError(f"no run record has a setting '{key}'{hint}")

    groups = {}  # 除了 key 以外的設定 -> 這組的 runs（由舊到新）
    for r in records:
        rest = {k: v for k, v in settings(r).items() if k != key}
        groups.setdefault(tuple(sorted(rest.items())), []).append(r)

    def strength(item):  # 不同值最多的一組；平手時 runs 較多的；再平手時最新的
        runs = item[1]
        return len({show(value_of(r, key)) for r in runs}), len(runs), records.index(runs[-1])

    rest, runs = max(groups.items(), key=strength)
    common = dict(rest)
    newest = {}
    for r in runs:  # 由舊到新，所以最後留下的是最新的
        newest[show(value_of(r, key))] = r
    older = {v: [r for r in runs if show(value_of(r, key)) == v and r is not newest[v]] for v in newest}
    flagged = []
    for r in records:
        if r in runs:
            continue
        theirs = {k: v for k, v in settings(r).items() if k != key}
        diff = {k: (theirs.get(k), common.get(k)) for k in sorted(set(theirs) | set(common))
                if theirs.get(k) != common.get(k)}
        flagged.append((r, diff))
    return {"shown": sorted(newest.values(), key=lambda r: _sort_key(r, key)),
            "older": {v: rs for v, rs in older.items() if rs}, "flagged": flagged, "common": common}


def value_of(record, key):
    s = settings(record)
    return s[key] if key in s else record["config"].get(key)  # 被忽略的 key（如 device）也可以拿來比較


def _sort_key(record, key):
    """Numbers in numeric order; anything else (target_modules ...) by trainable parameters, then by name."""
    v = value_of(record, key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return 0, v, ""
    return 1, record["parameters"]["trainable"], show(v)


# ----------------------------------------------------------------------------------------------- 表格
COLUMNS = ("trainable params", "% of base model", "adapter size", "val loss (base -> final)",
           "perplexity (base -> final)", "train time", "adapter folder")
RIGHT = {"trainable params", "% of base model", "adapter size", "train time"}  # 數字欄靠右對齊


def size_text(n_bytes):
    return f"{n_bytes / MiB:.2f} MiB" if n_bytes >= 0.1 * MiB else f"{n_bytes / 1024:.1f} KiB"


def time_text(seconds):
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} m {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} m"


def adapter_folder(record):
    """Where this run's adapter is now. A later run with the same --output moves the folder to <output>.bak-<time>,
    so the record's output_dir may hold a newer run: find the folder whose training_metrics.json is this record."""
    if "output_dir" not in record:
        return "?"
    out = Path(record["output_dir"])
    mine = {k: v for k, v in record.items() if k not in ("output_dir", "_file")}
    for folder in (out, *sorted(out.parent.glob(f"{out.name}.bak-*"))):
        try:
            if json.loads((folder / "training_metrics.json").read_text(encoding="utf-8")) == mine:
                rel = os.path.relpath(folder)
                return folder.as_posix() if rel.startswith("..") else Path(rel).as_posix()
        except (OSError, ValueError):
            continue
    return f"(moved or deleted: was {out.name})"


def table_row(record, key):
    p, final = record["parameters"], record["eval"][-1]
    base = p["total"] - p["trainable"]  # p["total"] 含 LoRA 參數；「佔原模型幾 %」要除以原模型的參數量
    return {
        key: show(value_of(record, key)),
        "trainable params": f"{p['trainable']:,}",
        "% of base model": f"{100 * p['trainable'] / base:.3f}%",
        "adapter size": size_text(record["adapter_bytes"]) if "adapter_bytes" in record else "?",
        "val loss (base -> final)": f"{record['base_val_loss']:.4f} -> {final['val_loss']:.4f}",
        "perplexity (base -> final)": f"{record['base_val_perplexity']:.2f} -> {final['val_perplexity']:.2f}",
        "train time": time_text(record.get("train_time_s", 0.0)),
        "adapter folder": adapter_folder(record),
    }


def text_table(rows, columns):
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    line = lambda cells: "  ".join(cells[c].rjust(widths[c]) if c in RIGHT or c == columns[0]
                                   else cells[c].ljust(widths[c]) for c in columns).rstrip()
    return "\n".join([line({c: c for c in columns}), line({c: "-" * widths[c] for c in columns}),
                      *(line(r) for r in rows)])


def markdown_table(rows, columns):
    align = ["---:" if c in RIGHT or c == columns[0] else ":---" for c in columns]
    cell = lambda s: s.replace("->", "→").replace("|", "\\|")
    return "\n".join(["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "|".join(align) + "|",
                      *("| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows)])


def notes(result, key):
    """Lines under the table: what was hidden (older duplicates) and what was not compared (and why)."""
    lines = []
    for value, runs in result["older"].items():
        lines.append(f"{key}={value}: {len(runs) + 1} runs; showing the newest, older: "
                     f"{', '.join(r['_file'].name for r in runs)}")
    if result["flagged"]:
        lines.append(f"Not compared ({len(result['flagged'])} runs differ from these in more than {key}):")
        suggest = set()
        for r, diff in result["flagged"]:
            what = ", ".join(f"{k}={show(theirs)} (compared runs: {show(ours)})" for k, (theirs, ours) in diff.items())
            lines.append(f"  {r['_file'].name}: {key}={show(value_of(r, key))}; {what}")
            if len(diff) == 1:
                suggest |= set(diff)
        for k in sorted(suggest):
            lines.append(f"  -> to compare those by {k}: python utils.py compare --by {k}")
    return lines


# ----------------------------------------------------------------------------------------------- 圖
def plot_comparison(result, key, path):
    """Three panels: final validation loss vs key, trainable parameters vs key (log axis), train loss curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = result["shown"]
    values = [value_of(r, key) for r in runs]
    labels = [show(v) for v in values]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = values if numeric else list(range(len(runs)))  # 文字型的值（target_modules）等距排開

    fig, (ax_loss, ax_params, ax_curves) = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110)
    ax_loss.plot(x, [r["eval"][-1]["val_loss"] for r in runs], "o-", color="tab:orange", lw=2,
                 label="after training")
    ax_loss.axhline(runs[0]["base_val_loss"], color="gray", ls="--", lw=1,
                    label=f"base model ({runs[0]['base_val_loss']:.3f})")
    for xi, r in zip(x, runs):
        ax_loss.annotate(f"{r['eval'][-1]['val_loss']:.4f}", (xi, r["eval"][-1]["val_loss"]),
                         textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small")
    ax_loss.ticklabel_format(axis="y", useOffset=False)  # 顯示真正的 loss 值，而不是「+5.806」這種位移
    ax_loss.set_ylabel("validation loss (nats / token)")
    ax_loss.set_title(f"final validation loss vs {key}")
    ax_loss.legend()
    ax_params.plot(x, [r["parameters"]["trainable"] for r in runs], "s-", color="tab:green", lw=2)
    for xi, r in zip(x, runs):
        ax_params.annotate(f"{r['parameters']['trainable']:,}", (xi, r["parameters"]["trainable"]),
                           textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small")
    ax_params.set_yscale("log")  # rank 每翻倍，參數量就翻倍：對數軸上是一條直線
    ax_params.set_ylabel("trainable parameters (log scale)")
    ax_params.set_title(f"trainable parameters vs {key}")
    for ax in (ax_loss, ax_params):
        if numeric and min(values) > 0 and max(values) / min(values) >= 4:
            ax.set_xscale("log", base=2)  # 2, 4, 8, 16, 32 在對數軸上等距
        ax.set_xticks(x, labels, rotation=20 if not numeric else 0)
        ax.minorticks_off()
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)

    for r, label in zip(runs, labels):
        steps = [t["step"] for t in r["train_loss"]]
        ax_curves.plot(steps, ema([t["loss"] for t in r["train_loss"]]), lw=1.5, label=f"{key}={label}")
    ax_curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curves.set_title("training loss (smoothed)")
    ax_curves.set_xlabel("optimizer step")
    ax_curves.set_ylabel("cross-entropy loss (nats / token)")
    ax_curves.grid(alpha=0.3)
    ax_curves.legend(fontsize="small")
    common = result["common"]
    model = show(common.get("model"))
    model = Path(model).name if Path(model).is_absolute() else model  # 本機資料夾只顯示名稱
    fig.suptitle(f"LoRA: comparing {key} — {model} on {show(common.get('dataset'))}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- 主程式
def compare(results_dir, key, out=print):
    """Print the comparison table, write compare_<key>.md and compare_<key>.png into results_dir.
    Returns (markdown path, png path)."""
    records = load_records(results_dir)
    result = group_runs(records, key)
    columns = (key, *COLUMNS)
    rows = [table_row(r, key) for r in result["shown"]]
    common = result["common"]
    same = ", ".join(f"{k}={show(common[k])}" for k in HEADLINE_KEYS if k in common)
    n_values = len(result["shown"])
    out(f"Comparing {key} over {n_values} run{'s' * (n_values != 1)} in {results_dir}")
    out(f"Same for all: {same} (full settings: each record's config)")
    out(text_table(rows, columns))
    if n_values == 1:
        out(f"Only one value of {key} among these runs: train with other values to compare.")
    extra = notes(result, key)
    for line in extra:
        out(line)

    folder = Path(results_dir)
    png, md = folder / f"compare_{key}.png", folder / f"compare_{key}.md"
    plot_comparison(result, key, png)
    text = [f"<!-- written by: python utils.py compare --by {key} --results_dir {results_dir} -->",
            f"### LoRA: comparing {key}", "", f"Same for all runs: {same}.", "", markdown_table(rows, columns), ""]
    if extra:
        text += ["```", *extra, "```", ""]
    text += [f"![{key} comparison]({png.name})", ""]
    md.write_text("\n".join(text), encoding="utf-8")
    out(f"Wrote {md} and {png}")
    return md, png
