"""The errors that reading, converting and checking weights raise.

Both are ValueErrors whose message names the file, folder, component or tensor at fault, so a command
line can print them as one clear line (or, for a mismatch, a short list).
"""

from __future__ import annotations

from collections.abc import Iterable

# How many names of each kind a ConversionError's message shows (the attributes keep them all).
SHOWN = 40


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be read; the message names the file or tensor."""


class ConversionError(ValueError):
    """A state dict or params tree does not fit the model; the message lists the offending names.

    Attributes:
      missing: param paths the model has and the source lacks.
      unexpected: names the source has and the model lacks.
      misshaped: one line per name whose shape does not fit, both shapes given
        (`key (shape) -> param/path (shape)` for a state dict, `param/path (shape), expected (shape)`
        for a params tree).
    """

    def __init__(self, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 misshaped: Iterable[str] = (), *, source: str = "checkpoint"):
        self.what = what
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
        verb = "do" if source.endswith("params") else "does"
        lines = [f"{what}: the {source} {verb} not match the model."]
        for title, items in ((f"missing from the {source}", self.missing),
                             (f"unexpected in the {source}", self.unexpected),
                             ("wrong shape", self.misshaped)):
            if items:
                more = " ..." if len(items) > SHOWN else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:SHOWN]) + more)
        super().__init__("\n".join(lines))
