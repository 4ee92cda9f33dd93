"""The byte-level tokenizer of the built-in models: token i < 256 is byte i, then a few special tokens.

Any text encodes (UTF-8 bytes), nothing is out of vocabulary, and decoding undoes encoding
exactly; invalid UTF-8 from a model's output decodes with replacement characters. A checkpoint
directory records it in `tokenizer_config.json` (`{"tokenizer_class": "ByteTokenizer"}`), which
`ByteTokenizer.from_pretrained` reads back.
"""

from __future__ import annotations

import json
import os

CONFIG = "tokenizer_config.json"


class ByteTokenizer:
  """UTF-8 bytes as tokens 0-255; `bos_id` 256, `eos_id` 257, `pad_id` 258."""

  bos_id, eos_id, pad_id = 256, 257, 258
  vocab_size = 259  # the smallest vocabulary that holds it; a model's may be larger

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """`text` -> token ids, with BOS / EOS around it when asked."""
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {type(text).__name__}")
    return ([self.bos_id] if bos else []) + list(text.encode("utf-8")) + ([self.eos_id] if eos else [])

  def decode(self, ids) -> str:
    """Token ids -> text; special tokens are dropped, bytes that are not valid UTF-8 become U+FFFD."""
    data = bytearray()
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is not in the byte tokenizer's vocabulary [0, {self.vocab_size})")
      if i < 256:
        data.append(i)
    return data.decode("utf-8", errors="replace")

  def save_pretrained(self, path: str | os.PathLike) -> None:
    with open(os.path.join(os.fspath(path), CONFIG), "w") as f:
      json.dump({"tokenizer_class": "ByteTokenizer", "bos_token_id": self.bos_id, "eos_token_id": self.eos_id,
                 "pad_token_id": self.pad_id}, f, indent=2)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "ByteTokenizer":
    """Reads `tokenizer_config.json`; ValueError if it names another tokenizer."""
    file = os.path.join(os.fspath(path), CONFIG)
    with open(file) as f:
      config = json.load(f)
    if config.get("tokenizer_class") != "ByteTokenizer":
      raise ValueError(f"{file} names tokenizer {config.get('tokenizer_class')!r}, not ByteTokenizer")
    return cls()
