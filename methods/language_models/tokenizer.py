"""Byte-level BPE tokenizer trained locally with `tokenizers`, wrapped for transformers.

Byte-level BPE (GPT-2 style): text is mapped to bytes, each byte to one of 256 base
symbols, and BPE merges are learned on top, so every string round-trips exactly
(`decode(encode(text)) == text`) and there is no unknown token.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<unk>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    min_frequency: int = 2,
    extra_special_tokens: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`.

    The end-of-text token doubles as BOS/EOS; a separate pad token is added so
    padding can be masked without hiding real end-of-text tokens.
    """
    special_tokens = [EOS_TOKEN, PAD_TOKEN, *extra_special_tokens]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _for_transformers(backend, extra_special_tokens)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save with `save_pretrained`; returns the directory."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `save_tokenizer` (local files only)."""
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def stdlib_source_texts(package: str = "json", max_files: int | None = None) -> list[str]:
    """Source text of the `.py` files of a standard-library package (offline corpus)."""
    module = importlib.import_module(package)
    root = Path(module.__file__).parent
    files = sorted(root.rglob("*.py"))[:max_files]
    return [path.read_text(encoding="utf-8") for path in files]


def train_word_tokenizer(texts: Iterable[str], extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace-separated words, one id each (decode joins with spaces).

    For templated worlds whose words are few; unknown words map to ``<unk>``. ``extra_special_tokens``
    must occur as words in ``texts``; they keep those ids (the trainer would otherwise count them twice).
    """
    backend = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(
        special_tokens=[EOS_TOKEN, PAD_TOKEN, UNK_TOKEN], show_progress=False))
    return _for_transformers(backend, extra_special_tokens, unk_token=UNK_TOKEN)


def _for_transformers(backend: Tokenizer, extra_special_tokens: tuple[str, ...], **special: str
                      ) -> PreTrainedTokenizerFast:
    """The trained backend as a transformers tokenizer: end-of-text as BOS and EOS, its own pad token."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(extra_special_tokens),
        clean_up_tokenization_spaces=False,
        **special,
    )
