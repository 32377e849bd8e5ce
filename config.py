"""Training configuration: built-in defaults < config.yaml < command-line flags.

Every field of `Config` is a key in config.yaml and a flag (`rank` -> `--rank`). Values are checked here, once,
so the training script can trust them; a bad value is a one-line `UserError` that names the fix.
"""
import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from errors import UserError


@dataclass
class Config:
    # --- 模型 ---
    model: str = "gpt2"  # Hub id、本機資料夾，或內附的 smollm2-135m
    offline_fallback: str | None = "smollm2-135m"  # Hub 連不上且沒有快取時改用它；null = 直接報錯
    # --- LoRA ---
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    use_rslora: bool = False
    # --- 資料 ---
    dataset: str = "fortunes"  # 內附的 fortunes、Hub 資料集名稱，或本機 .txt / .jsonl
    dataset_config: str | None = None
    max_length: int = 256
    val_fraction: float = 0.05
    # --- 訓練 ---
    epochs: int = 3
    max_steps: int | None = None  # 設定後覆蓋 epochs
    batch_size: int = 8
    gradient_accumulation_steps: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    fp16: bool = False
    bf16: bool = False
    device: str = "auto"
    seed: int = 42
    # --- 評估與紀錄 ---
    eval_steps: int = 50
    eval_max_blocks: int | None = None
    sample_prompt: str = "Q: What is the secret of a happy life?\nA:"
    sample_max_new_tokens: int = 40
    # --- CPU 預算：只在 CPU 上生效，各取較小值，啟動時印出 ---
    cpu_max_steps: int | None = 60
    cpu_max_length: int | None = 128
    cpu_gradient_accumulation_steps: int | None = 1
    cpu_eval_max_blocks: int | None = 64
    # --- 輸出 ---
    output: str = "output"
    logdir: str = "logs"
    results_dir: str = "results"
    resume: str | None = None


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _base_type(name):
    """(python type, is_list, optional) of a field, from its annotation."""
    hint = typing.get_type_hints(Config)[name]
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    if optional:
        hint = next(a for a in hint.__args__ if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _coerce(name, value):
    """Convert a YAML/CLI value to the field's type, or raise a UserError that names the key and the fix."""
    kind, is_list, optional = _base_type(name)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise UserError(f"{name} cannot be null: give it a value (default {getattr(Config(), name)!r})")
    if is_list:
        values = value.split() if isinstance(value, str) else value
        if not isinstance(values, list) or not values:
            raise UserError(f"{name} must be a list, e.g. {name}: [q_proj, v_proj]")
        return [str(v) for v in values]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:  # YAML 1.1 把 `2e-4` 讀成字串；這裡一併轉成數字
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except ValueError:
        raise UserError(f"{name} must be {'an integer' if kind is int else 'a ' + kind.__name__}, "
                        f"got {value!r}: e.g. {name}: {getattr(Config(), name)!r}") from None


def _suggest(key, valid):
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f": did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def validate(cfg):
    """Range checks that the types alone don't catch."""
    checks = [
        (cfg.rank > 0, f"rank must be a positive integer, got {cfg.rank}: try --rank 8"),
        (cfg.alpha > 0, f"alpha must be > 0, got {cfg.alpha}: try --alpha 16 (2 x rank is common)"),
        (0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}: try --dropout 0.05"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}: the course suggests 1e-4 to 5e-4"),
        (cfg.batch_size > 0, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.gradient_accumulation_steps > 0,
         f"gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}"),
        (cfg.max_length >= 2, f"max_length must be >= 2, got {cfg.max_length}"),
        (cfg.epochs > 0, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.max_steps is None or cfg.max_steps > 0, f"max_steps must be >= 1 or null, got {cfg.max_steps}"),
        (cfg.eval_steps > 0, f"eval_steps must be >= 1, got {cfg.eval_steps}"),
        (0 < cfg.val_fraction < 1, f"val_fraction must be in (0, 1), got {cfg.val_fraction}"),
        (0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}"),
        (cfg.max_grad_norm > 0, f"max_grad_norm must be > 0, got {cfg.max_grad_norm}"),
        (not (cfg.fp16 and cfg.bf16), "fp16 and bf16 are both set: choose one (--bf16 if your GPU supports it)"),
        (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
         f"device must be auto, cpu or cuda, got {cfg.device!r}"),
    ]
    for name in ("cpu_max_steps", "cpu_max_length", "cpu_gradient_accumulation_steps", "cpu_eval_max_blocks",
                 "eval_max_blocks"):
        value = getattr(cfg, name)
        checks.append((value is None or value > 0, f"{name} must be >= 1 or null, got {value}"))
    from transformers import SchedulerType  # transformers.get_scheduler 認得的名稱

    schedulers = [t.value for t in SchedulerType]
    checks.append((cfg.lr_scheduler in schedulers,
                   f"lr_scheduler must be one of {', '.join(schedulers)}, got {cfg.lr_scheduler!r}"))
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return cfg


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (run from the repo root, or pass --config path/to/config.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping of key: value lines")
    for key in data:
        if key not in FIELDS:
            raise UserError(f"unknown key '{key}' in {path}{_suggest(str(key), list(FIELDS))}")
    return data


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse 預設印出整段 usage；我們只給一行，並猜使用者想打的 flag
        if "unrecognized arguments" in message:
            flag = message.split(":", 1)[1].split()[0].split("=")[0]
            close = difflib.get_close_matches(flag, [a for a in self._option_string_actions], n=1)
            message += f": did you mean {close[0]}?" if close else ": see --help"
        raise UserError(message)


def build_parser(description=""):
    parser = _Parser(description=description, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with any of the keys below (default: none, built-in defaults)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    for name in FIELDS:
        kind, is_list, _ = _base_type(name)
        if kind is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction)
        elif is_list:
            parser.add_argument(f"--{name}", nargs="+", metavar=name.upper())
        else:
            parser.add_argument(f"--{name}", metavar=kind.__name__.upper())
    return parser


def load_config(argv=None):
    """defaults < --config YAML < flags. Returns (Config, set of keys given as flags)."""
    args = build_parser().parse_args(argv)
    values = read_yaml(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    values.update(flags)  # flag 優先於 YAML
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    return validate(cfg), set(flags)


def as_dict(cfg):
    return dataclasses.asdict(cfg)


if __name__ == "__main__":  # python config.py --config config.yaml --rank 4  → 印出合併後的設定
    try:
        print(yaml.safe_dump(as_dict(load_config()[0]), sort_keys=False, allow_unicode=True))
    except UserError as e:
        sys.exit(f"error: {e}")
