"""Fixtures of the data tests: one trained BPE tokenizer per session, small source files."""
from __future__ import annotations

import pytest
from tok_helpers import make_tokenizer_dir


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tok(tok_dir):
    from moedist.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)

