"""`python -m model.convert SRC DST`: rewrites a checkpoint in another precision (model weights and tokenizer only).

  python -m model.convert /tmp/run/step_00001000 model/demo_checkpoint --dtype=bfloat16
  python -m model.convert ./DeepSeek-V3-FP8 ./DeepSeek-V3-bf16 --dtype=bfloat16   # FP8 -> bf16
  python -m model.convert ./bf16 ./fp8 --fp8                                       # bf16 -> FP8

Reads SRC with `from_pretrained(dtype=...)` and writes DST with `save_pretrained` (atomically;
`--overwrite` replaces an existing DST). Tokenizer files in SRC are copied; anything else there
(a trainer's optimizer state, say) is left behind.
"""

from __future__ import annotations

import os
import shutil

from absl import app, flags

flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "precision of the written weights")
flags.DEFINE_bool("fp8", False, "store the projections in FP8 (e4m3, 128x128 block scales), as DeepSeek does")
flags.DEFINE_bool("overwrite", False, "replace DST if it exists")
FLAGS = flags.FLAGS

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "generation_config.json")


def convert(src: str, dst: str, *, dtype: str = "bfloat16", fp8: bool = False, overwrite: bool = False) -> None:
  """Writes SRC's model (and tokenizer files) to DST in `dtype` (FP8 projections with `fp8`)."""
  import jax.numpy as jnp

  from model.checkpoint import from_pretrained, save_pretrained
  if not os.path.isdir(src):
    raise ValueError(f"src {src!r} is not a directory")
  if os.path.exists(dst) and not overwrite:
    raise ValueError(f"dst {dst!r} exists; pass overwrite=True (--overwrite) to replace it")
  loaded = from_pretrained(src, dtype=getattr(jnp, dtype))
  if os.path.isdir(dst):
    shutil.rmtree(dst)  # so that save_pretrained carries over nothing stale
  save_pretrained(loaded, dst, fp8=fp8)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m model.convert SRC DST [--dtype=bfloat16] [--fp8] [--overwrite]")
  try:
    convert(argv[1], argv[2], dtype=FLAGS.dtype, fp8=FLAGS.fp8, overwrite=FLAGS.overwrite)
  except ValueError as err:
    raise app.UsageError(str(err)) from err
  print(f"wrote {argv[2]}")


if __name__ == "__main__":
  app.run(main)
