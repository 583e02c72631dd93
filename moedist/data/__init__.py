"""Data: tokenizers, named sources and formats, loss masks, packing, memory-mapped cache."""
from moedist.data.batch import IGNORE, Batch
from moedist.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, resolve_tokenizer,
                                    tokenizer_from_dir)

__all__ = ["IGNORE", "Batch", "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "resolve_tokenizer",
           "tokenizer_from_dir"]
