"""How one request is sampled and when it stops: `SamplingParams`, validated on construction."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Sampling and stopping for one request (OpenAI's parameters, vLLM's names).

  Attributes:
    temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of tokens whose probability reaches p (1.0: all).
    max_tokens: the most tokens to generate; None: until the model's length limit.
    stop: strings that end the output when generated; the output excludes the stop string.
    seed: the request's random seed, in [0, 2**32); the same seed, prompt and parameters give the same output
      whatever else is batched with it. None: drawn from the engine's seed.
    ignore_eos: keep generating past the end-of-sequence token.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_tokens: int | None = 16
  stop: tuple[str, ...] = ()
  seed: int | None = None
  ignore_eos: bool = False

  def __post_init__(self):
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    object.__setattr__(self, "stop", tuple(self.stop))
    _number("temperature", self.temperature, minimum=0.0)
    _integer("top_k", self.top_k, minimum=0)
    _number("top_p", self.top_p, minimum=0.0, maximum=1.0)
    if self.top_p == 0.0:
      raise ValueError("top_p must be in (0, 1], got 0")
    if self.max_tokens is not None:
      _integer("max_tokens", self.max_tokens, minimum=1)
    if self.seed is not None:
      _integer("seed", self.seed, minimum=0, maximum=2**32 - 1)  # a uint32 on the device
    if not all(isinstance(s, str) and s for s in self.stop):
      raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
    if not isinstance(self.ignore_eos, bool):
      raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def _number(name: str, value, *, minimum: float, maximum: float = math.inf) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  if not minimum <= value <= maximum:
    raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")


def _integer(name: str, value, *, minimum: int, maximum: int = 2**31 - 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if not minimum <= value <= maximum:
    raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
