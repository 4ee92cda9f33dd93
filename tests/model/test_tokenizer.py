"""The byte tokenizer: exact round trips, special tokens, and its record in a checkpoint directory."""

from __future__ import annotations

import json

import pytest

from model.tokenizer import ByteTokenizer


def test_round_trip_and_specials(tmp_path):
  tok = ByteTokenizer()
  text = "def f(x):\n  return 'héllo ✓'\n"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids[1:-1]) < 256
  assert len(ids) == len(text.encode()) + 2 and tok.decode(ids) == text
  assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut UTF-8 sequence is replaced, not an error
  with pytest.raises(ValueError, match="token id 300"):
    tok.decode([300])
  with pytest.raises(ValueError, match="text must be a str"):
    tok.encode(b"bytes")
  tok.save_pretrained(tmp_path)
  assert isinstance(ByteTokenizer.from_pretrained(tmp_path), ByteTokenizer)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
  with pytest.raises(ValueError, match="LlamaTokenizer"):
    ByteTokenizer.from_pretrained(tmp_path)
