"""Tiny random-init models and a locally trained tokenizer for tests — never a download."""
import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
CORPUS = [
    "the cat sat on the mat.",
    "a dog ran in the park and the cat watched.",
    "to be or not to be, that is the question.",
    "all that glitters is not gold.",
    "the quick brown fox jumps over the lazy dog.",
] * 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in well under a second on CORPUS; GPT-2 style (EOS, no pad token)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = dict(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tok),
               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Llama-style: RMSNorm, SwiGLU MLP, GQA (4 query heads, 2 key/value heads), tied embeddings."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, vocab_size=len(tok),
               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def save_tiny_model(model, path) -> str:
    """Save model + tokenizer as a local directory that `--model <dir>` can load."""
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)
