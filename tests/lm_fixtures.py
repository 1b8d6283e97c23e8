"""A tiny randomly initialised Llama teacher with its own byte-level BPE tokenizer, saved as a Hugging Face
model directory: what `teacher.model: DIRECTORY` loads, built in a second without any download."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 256}


def corpus_files(n: int = 12) -> list[Path]:
    """A few small standard-library modules (the tests' text corpus)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["abc.py", "bisect.py", "colorsys.py", "copyreg.py", "fnmatch.py", "genericpath.py", "keyword.py",
             "linecache.py", "nturl2path.py", "opcode.py", "stat.py", "this.py", "token.py", "types.py",
             "heapq.py", "glob.py"]
    return [root / name for name in names[:n] if (root / name).is_file()]


def tiny_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((p.read_text(encoding="utf-8") for p in corpus_files()), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama_dir(path: Path, seed: int = 0, **sizes) -> Path:
    """Save a tiny Llama (random weights) and its tokenizer under `path`; returns `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                      **{"tie_word_embeddings": True, **TINY, **sizes})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
