"""One op, several implementations: how every op package picks its backend (DESIGN.md).

`select_and_run` is the single rule: an explicit name must exist (else ValueError listing the
choices); `None` tries the platform's preferred names in order, falling through on
`NotImplementedError` (a backend that cannot handle this case or this machine).
"""

from backends.select import select_and_run

__all__ = ["select_and_run"]
