"""Text windows get the tokenizer's leading ids (BOS) back; GGUF-converted tokenizers that lost their merges
are refused."""

import pytest
import torch

from attnpatch.eval.tokens import leading_ids, text_window
from attnpatch.models import check_converted_tokenizer


class CharTokenizer:
    """One id per character (what a GGUF conversion without merges gives), optional BOS first."""

    def __init__(self, bos: int | None = None):
        self.bos = bos

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [ord(c) for c in text]
        if add_special_tokens and self.bos is not None:
            ids = [self.bos] + ids
        ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return type("Encoding", (), {"input_ids": ids})()


class WordTokenizer(CharTokenizer):
    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [len(w) for w in text.split()]
        if add_special_tokens and self.bos is not None:
            ids = [self.bos] + ids
        ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return type("Encoding", (), {"input_ids": ids})()


@pytest.mark.parametrize("bos", [None, 2])
def test_text_window_starts_with_the_leading_ids(bos):
    tok = CharTokenizer(bos)
    assert leading_ids(tok) == ([] if bos is None else [bos])
    ids = text_window(tok, "abcdefghij", 4, offset=3)
    assert ids.tolist() == [([] if bos is None else [bos]) + [ord(c) for c in "defg"]]
    with pytest.raises(ValueError, match="only 2 tokens after offset 8; 4 asked"):
        text_window(tok, "abcdefghij", 4, offset=8)


def test_a_converted_tokenizer_without_merges_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"transformers_version": "5.17.0"}')
    check_converted_tokenizer(WordTokenizer(), tmp_path)
    with pytest.raises(ValueError, match="lost the merges .converted by transformers 5.17.0"):
        check_converted_tokenizer(CharTokenizer(), tmp_path)
