"""Incremental detokenization (UTF-8 split across tokens, stop strings held back) and SamplingParams validation."""

from __future__ import annotations

import pytest

from model.tokenizer import ByteTokenizer
from serve.detokenizer import IncrementalText
from serve.sampling_params import SamplingParams
from serve.tokenizers import load_tokenizer, plain_chat_template


def stream(text: str, stop=()) -> tuple[list[str], IncrementalText]:
  ids = list(text.encode())
  inc = IncrementalText(ByteTokenizer().decode, tuple(stop))
  pieces = [inc.update(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1)]
  return pieces, inc


def test_a_character_split_over_tokens_is_sent_once_whole():
  pieces, inc = stream("a€b")  # € is three bytes
  assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "a€b" == inc.text
  assert pieces[1] == pieces[2] == ""  # held until its last byte


def test_stop_strings_cut_the_text_and_are_never_sent():
  pieces, inc = stream("hello\n\nworld", stop=["\n\n"])
  assert inc.stopped and inc.text == "hello" and "".join(pieces) == "hello"
  pieces, inc = stream("a\nb", stop=["\n\n"])  # a lone newline is held, then released
  assert not inc.stopped and "".join(pieces) == "a\nb" and pieces[1] == ""


def test_sampling_params_errors_name_the_field():
  for kwargs, field in [({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                        ({"top_k": -1}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"seed": -3}, "seed"),
                        ({"stop": [""]}, "stop"), ({"temperature": float("nan")}, "temperature"),
                        ({"max_tokens": True}, "max_tokens"), ({"seed": 2**32}, "seed"), ({"top_k": 2**31}, "top_k")]:
    with pytest.raises(ValueError, match=field):
      SamplingParams(**kwargs)
  assert SamplingParams(stop="x").stop == ("x",) and SamplingParams(temperature=0).greedy


def test_tokenizers_and_the_plain_chat_template(tmp_path):
  byte = load_tokenizer(None)
  assert byte.decode(byte.encode("héllo")) == "héllo" and byte.eos_id == 257
  assert plain_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
  with pytest.raises(ValueError, match=r"messages\[0\]"):
    plain_chat_template([{"content": "no role"}])
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers
  hf = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>", "chat_template": '
                                                  '"{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"}')
  loaded = load_tokenizer(str(tmp_path))
  assert loaded.encode("hello world") == [1, 2] and loaded.eos_id == 3
  assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
