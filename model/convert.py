"""`python -m model.convert SRC DST`: rewrites a checkpoint in another precision (model weights and tokenizer only).

  python -m model.convert /tmp/run/step_00001000 model/demo_checkpoint --dtype=bfloat16
  python -m model.convert ./DeepSeek-V3-FP8 ./DeepSeek-V3-bf16 --dtype=bfloat16   # FP8 -> bf16
  python -m model.convert ./bf16 ./fp8 --fp8                                       # bf16 -> FP8

Reads SRC with `from_pretrained(dtype=...)` and writes DST with `save_pretrained` into a
staging directory that is then swapped in (`--overwrite` replaces an existing DST). Tokenizer
files in SRC are copied; anything else there (a trainer's optimizer state, say) is left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from absl import app, flags

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "generation_config.json")


def convert(src: str, dst: str, *, dtype: str = "bfloat16", fp8: bool = False, overwrite: bool = False) -> None:
  """Writes SRC's model (and tokenizer files) to DST in `dtype` (FP8 projections with `fp8`).

  DST is built in a staging directory beside it and swapped in, so a failure leaves any old
  DST as it was.
  """
  import jax.numpy as jnp

  from model.checkpoint import from_pretrained, save_pretrained
  if not os.path.isdir(src):
    raise ValueError(f"src {src!r} is not a directory")
  if os.path.exists(dst):
    if not overwrite:
      raise ValueError(f"dst {dst!r} exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.samefile(src, dst):
      raise ValueError(f"dst {dst!r} is src; write somewhere else")
  if dtype not in ("bfloat16", "float32", "float16"):
    raise ValueError(f"dtype must be bfloat16, float32 or float16, got {dtype!r}")
  loaded = from_pretrained(src, dtype=getattr(jnp, dtype))
  staging = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(os.path.abspath(dst)))
  try:
    save_pretrained(loaded, staging, fp8=fp8, overwrite=True)
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(src, name)):
        shutil.copyfile(os.path.join(src, name), os.path.join(staging, name))
    old = None
    if os.path.exists(dst):
      old = staging + ".old"
      os.rename(dst, old)
    os.rename(staging, dst)
    if old:
      shutil.rmtree(old)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m model.convert SRC DST [--dtype=bfloat16] [--fp8] [--overwrite]")
  try:
    convert(argv[1], argv[2], dtype=FLAGS.dtype, fp8=FLAGS.fp8, overwrite=FLAGS.overwrite)
  except ValueError as err:
    raise app.UsageError(str(err)) from err
  print(f"wrote {argv[2]}")


if __name__ == "__main__":
  # Defined here, not at import, so a binary that imports `convert` keeps its own flags.
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "precision of the written weights")
  flags.DEFINE_bool("fp8", False, "store the projections in FP8 (e4m3, 128x128 block scales), as DeepSeek does")
  flags.DEFINE_bool("overwrite", False, "replace DST if it exists")
  FLAGS = flags.FLAGS
  app.run(main)
