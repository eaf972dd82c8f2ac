"""How a teacher loss or a method was checked against its source, said out loud.

Why a record of its own: kdsweep's numbers are printed next to published ones. A reader must be
able to tell, from `sweep list`, a run's tags and the report's footnotes, whether a method is the
authors' (checked line by line against their released code), the paper's (checked against its
text, no code released or read), or our reconstruction from the paper's description, and what
we knowingly do differently. Nothing is presented as a paper's method that is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# What the implementation was checked against, strongest first.
Checked = Literal["authors-code", "paper-text", "reconstruction", "ours"]
CHECKED_MEANING: dict[str, str] = {
    "authors-code": "checked against the authors' released code",
    "paper-text": "checked against the paper's text (no released code checked)",
    "reconstruction": "reconstructed from the paper's description; not verified",
    "ours": "kdsweep's own baseline, no paper to match",
}


@dataclass(frozen=True)
class Fidelity:
    """`checked`: one of CHECKED_MEANING. `source`: the paper (and the code's address and commit
    when checked against code). `departures`: what we knowingly do differently, one sentence
    each; empty means none known."""

    checked: Checked
    source: str
    departures: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.checked not in CHECKED_MEANING:
            raise ValueError(
                f"fidelity: unknown checked={self.checked!r}; allowed: {', '.join(CHECKED_MEANING)}"
            )

    @property
    def is_papers(self) -> bool:
        """Whether the method may be called the paper's (checked against code or text)."""
        return self.checked in ("authors-code", "paper-text")

    def tag(self) -> str:
        """The short form runs are tagged with and tables footnote: `authors-code`,
        `reconstruction (2 departures)`."""
        n = len(self.departures)
        return self.checked + (f" ({n} departure{'s' if n > 1 else ''})" if n else "")

    def describe(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "meaning": CHECKED_MEANING[self.checked],
            "source": self.source,
            "departures": list(self.departures),
        }


UNDECLARED = Fidelity("reconstruction", "not declared", ("fidelity not yet declared",))
