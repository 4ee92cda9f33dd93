"""Incremental text for streaming: what may be sent so far, holding back what could still change.

Two things can change the tail of the text: a byte-level token that ends inside a UTF-8
character (it decodes as U+FFFD until the rest arrives), and the start of a stop string (the
output must end before it). Both are held back until the next tokens settle them.
"""

from __future__ import annotations


class IncrementalText:
  """Decodes a request's generated tokens and finds its stop strings.

  Args:
    decode: token ids -> text.
    stop: stop strings.
  """

  def __init__(self, decode, stop: tuple[str, ...]):
    self._decode = decode
    self._stop = stop
    self.text = ""     # the settled text (what has been or may be sent)
    self.sent = 0      # characters of `text` already reported as new
    self.stopped = False

  def update(self, token_ids: list[int], *, final: bool) -> str:
    """Takes all generated tokens so far; returns the newly settled text. After a stop string,
    `stopped` is True and `text` ends before it."""
    if self.stopped:  # the text ended at its stop string
      return ""
    full = self._decode(token_ids)
    cuts = [cut for cut in (full.find(stop) for stop in self._stop) if cut >= 0]
    if cuts:
      full, self.stopped = full[:min(cuts)], True
    if not final and not self.stopped:
      full = full[:len(full) - self._held(full)]
    self.text = full
    new = full[self.sent:]
    self.sent = len(full)
    return new

  def _held(self, text: str) -> int:
    """Characters at the end of `text` that may still change."""
    held = 0
    while held < len(text) and text[len(text) - 1 - held] == "\ufffd":  # an unfinished UTF-8 character
      held += 1
    for stop in self._stop:  # the longest tail that begins a stop string
      for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
          held = max(held, n)
          break
    return held
