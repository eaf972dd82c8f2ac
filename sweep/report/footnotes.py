"""How each method and teacher loss in the report's tables was checked against its paper: a
marker on its name in the tables and a footnote (fidelity.py) under them.

Why in the tables themselves: summary.md's numbers are read beside published ones. A name
alone (`ard`, `mcmi(lambda=0.1)`) would let a reader take a reconstruction, kdsweep's own
baseline, or an implementation with known departures for the paper's method; the marker says
so where the number is, the footnote says what differs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..fidelity import Fidelity
from ..methods import METHODS
from ..spec import SweepSpec
from ..teacher_losses import TEACHER_LOSSES

MARK = "†"
NO_TEACHER = "none"  # the teacher_loss of a teacher-free cell (spec.Cell)


def method_fidelity(name: str) -> Fidelity:
    return METHODS.get(name).fidelity  # UNDECLARED unless the method declares one


def loss_fidelity(name: str) -> Fidelity:
    return TEACHER_LOSSES.get(name).fidelity


def not_the_papers(f: Fidelity) -> bool:
    """Marked in the tables: reconstructed, ours, or with any known departure."""
    return not f.is_papers or bool(f.departures)


@dataclass
class Footnotes:
    """The methods and teacher losses of one report (names in first-seen order), and the
    teacher label -> loss name map the tables' teacher labels are read through; cells by key,
    as a teacher label may itself hold dots."""

    methods: dict[str, Fidelity] = field(default_factory=dict)
    losses: dict[str, Fidelity] = field(default_factory=dict)
    label_loss: dict[str, str] = field(default_factory=dict)
    cells: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (teacher, method)

    def method(self, name: str) -> str:
        """A method's name as a table shows it: with MARK when it is not the paper's."""
        f = self.methods.get(name) or method_fidelity(name)
        return name + (MARK if not_the_papers(f) else "")

    def teacher(self, label: str) -> str:
        """A teacher label (`mcmi(lambda=0.1)`) as a table shows it, marked by its loss."""
        loss = self.label_loss.get(label)
        if loss is None:
            return label  # `none`, or a label the spec does not know: nothing to say
        f = self.losses.get(loss) or loss_fidelity(loss)
        return label + (MARK if not_the_papers(f) else "")

    def cell(self, key: str) -> str:
        """A cell key (`mcmi(lambda=0.1).ard.pgd`) marked when its teacher or method is."""
        if key not in self.cells:
            return key
        teacher, method = self.cells[key]
        marked = self.teacher(teacher) != teacher or self.method(method) != method
        return key + (MARK if marked else "")

    def section(self) -> list[str]:
        if not (self.methods or self.losses):
            return []
        lines = [
            "## Fidelity",
            "",
            f"How each method and teacher loss above was checked against its paper. {MARK} marks "
            "one that is not the paper's as published: reconstructed from a description, "
            "kdsweep's own, or with the known departures listed.",
            "",
        ]
        if self.methods:
            lines += ["### Methods", ""] + _entries(self.methods.items()) + [""]
        if self.losses:
            lines += ["### Teacher losses", ""] + _entries(self.losses.items()) + [""]
        return lines


def _entries(items: Iterable[tuple[str, Fidelity]]) -> list[str]:
    """One bullet per name: tag, meaning and source; its departures as sub-bullets."""
    out = []
    for name, f in items:
        d = f.describe()
        mark = MARK if not_the_papers(f) else ""
        source = f.source.rstrip(". ")
        out.append(f"- `{name}`{mark}: {f.tag()}, {d['meaning']}. Source: {source}.")
        out += [f"  - {dep}" for dep in f.departures]
    return out


def footnotes(spec: SweepSpec, teacher_runs: Iterable[Any] = ()) -> Footnotes:
    """Every method of the grid's cells, the loss of every teacher label of their cells and of
    every teacher they load, and the loss of every teacher run (the teachers table also shows a
    fine-tuned teacher's starting one)."""
    notes = Footnotes()
    variants = spec.teacher_variants()
    for cell in spec.cells():
        notes.cells[cell.key] = (cell.teacher_loss, cell.method)
        notes.methods.setdefault(cell.method, method_fidelity(cell.method))
        if cell.teacher_loss in variants:
            _add_loss(notes, cell.teacher_loss, variants[cell.teacher_loss].loss)
    for t in spec.all_teachers():  # a method's other teachers (MTARD's robust one, ensembles)
        _add_loss(notes, t.label, t.loss)
    for run in teacher_runs:
        label = run.data.tags.get("teacher_label", run.info.run_name)
        loss = run.data.params.get("loss") or getattr(variants.get(label), "loss", None)
        if loss is not None and loss != NO_TEACHER:
            _add_loss(notes, label, loss)
    return notes


def _add_loss(notes: Footnotes, label: str, loss: str) -> None:
    if loss not in TEACHER_LOSSES:
        return  # a run logged by another version of kdsweep: no record to show
    notes.label_loss.setdefault(label, loss)
    notes.losses.setdefault(loss, loss_fidelity(loss))
