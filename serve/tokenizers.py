"""Tokenizers for serving: byte-level for the built-in models, Hugging Face `tokenizers` for checkpoints with a `tokenizer.json`.

Both give `encode(text) -> ids`, `decode(ids) -> text`, `eos_id`, `vocab_size` and
`apply_chat_template(messages) -> prompt text`. A checkpoint without a chat template gets a
plain one ("role: content" lines, then "assistant:"), which is what the byte-level demo model
can continue.
"""

from __future__ import annotations

import json
import os

from model.tokenizer import CONFIG, ByteTokenizer


def plain_chat_template(messages: list[dict]) -> str:
  """`role: content` per message and a final `assistant:` for the reply."""
  lines = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
      raise ValueError(f"messages[{i}] must be an object with a string 'role', got {message!r}")
    content = message.get("content", "")
    if isinstance(content, list):  # OpenAI's content parts: keep the text ones
      content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
      raise ValueError(f"messages[{i}].content must be a string or text parts, got {type(content).__name__}")
    lines.append(f"{message['role']}: {content}")
  return "\n".join(lines) + "\nassistant:"


class ByteLevel:
  """The built-in byte tokenizer (`model.tokenizer.ByteTokenizer`) with serving's interface."""

  def __init__(self):
    self._inner = ByteTokenizer()
    self.eos_id = ByteTokenizer.eos_id
    self.vocab_size = ByteTokenizer.vocab_size

  def encode(self, text: str) -> list[int]:
    return self._inner.encode(text)

  def decode(self, ids) -> str:
    return self._inner.decode(ids)

  def apply_chat_template(self, messages: list[dict]) -> str:
    return plain_chat_template(messages)


class HuggingFace:
  """A `tokenizer.json` through the `tokenizers` library; the chat template of
  `tokenizer_config.json` is rendered with jinja2 when it has one."""

  def __init__(self, path: str):
    import tokenizers
    self._inner = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    self.vocab_size = self._inner.get_vocab_size(with_added_tokens=True)
    config = _read_config(path)
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    self.eos_id = config.get("eos_token_id", self._inner.token_to_id(eos) if eos else None)
    self._bos = config.get("bos_token")
    self._bos = self._bos.get("content") if isinstance(self._bos, dict) else self._bos
    self._template = config.get("chat_template")

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {type(text).__name__}")
    return self._inner.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._inner.decode([int(i) for i in ids], skip_special_tokens=True)

  def apply_chat_template(self, messages: list[dict]) -> str:
    if not self._template:
      return plain_chat_template(messages)
    import jinja2
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(self._template)
    return template.render(messages=messages, add_generation_prompt=True, bos_token=self._bos or "")


def _read_config(path: str) -> dict:
  file = os.path.join(path, CONFIG)
  if not os.path.exists(file):
    return {}
  with open(file) as f:
    return json.load(f)


def load_tokenizer(path: str | None):
  """The tokenizer of a checkpoint directory (byte-level when `path` is None or names it)."""
  if path is None:
    return ByteLevel()
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    return HuggingFace(path)
  config = _read_config(path)
  if config.get("tokenizer_class", "ByteTokenizer") != "ByteTokenizer":
    raise ValueError(f"{path} names tokenizer {config['tokenizer_class']!r} but has no tokenizer.json")
  return ByteLevel()
