"""Data: tokenizers, named sources and formats, loss masks, packing, memory-mapped cache."""
from moedist.data.batch import IGNORE, Batch
from moedist.data.cache import SourceCache, build_caches, open_cache, source_key
from moedist.data.chat import chat_ids_and_mask
from moedist.data.dataset import TokenData, build_data
from moedist.data.formats import read_documents
from moedist.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, resolve_tokenizer,
                                    tokenizer_from_dir)

__all__ = ["IGNORE", "Batch", "ByteTokenizer", "HFTokenizer", "SourceCache", "TokenData", "Tokenizer",
           "build_caches", "build_data", "chat_ids_and_mask", "load_tokenizer", "open_cache", "read_documents",
           "resolve_tokenizer", "source_key", "tokenizer_from_dir"]
