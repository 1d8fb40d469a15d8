"""``results.csv``: one line per manifest row, in manifest order, appended as rows
finish and synced to disk per batch, so a crash loses only the unsynced tail.

No field ever holds a line break, so a line is a row and a half-written last line
is recognisable by its missing newline.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from onnxcam.audit.backend import read_source
from onnxcam.engine.images import DEFAULT_LIMITS
from onnxcam.errors import AuditError

COLUMNS = (
    "image", "label", "pred", "score", "correct", "energy_in_box", "pointing_hit", "heatmap",
    "status", "error", "explained", "box_area", "deletion_auc", "insertion_auc",
)
# Multi-label and segmentation audits: one line per map, ``row`` its manifest row.
MULTI_COLUMNS = (*COLUMNS, "row")
HEADER = ",".join(COLUMNS) + "\n"

ResultRow = dict[str, str]


def one_line(text: str) -> str:
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


class ResultsWriter:
    """Appends rows to results.csv (writing the header first when the file is new)."""

    def __init__(self, path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
        fresh = not path.exists() or path.stat().st_size == 0
        self.columns = columns
        self.stream = open(path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.stream, lineterminator="\n")
        if fresh:
            self.stream.write(",".join(columns) + "\n")
            self.sync()

    def write(self, rows: Iterable[ResultRow]) -> None:
        self.writer.writerows([one_line(row.get(name, "")) for name in self.columns]
                              for row in rows)

    def sync(self) -> None:
        self.stream.flush()
        os.fsync(self.stream.fileno())

    def close(self) -> None:
        if not self.stream.closed:
            self.sync()
            self.stream.close()


def resume(path: Path, images: Iterator[str]) -> int:
    """How many complete rows ``path`` holds. A half-written last line is cut off; each
    kept row must be for the manifest's image at its position (``images``)."""
    if not path.exists():
        return 0
    _cut_partial_line(path)
    with open(path, newline="", encoding="utf-8") as stream:
        header = stream.readline()
        if not header:
            return 0
        if header != HEADER:
            raise AuditError(f"{path}: not an onnxcam audit results file (header differs); "
                             "choose another --out")
        done = 0
        for done, row in enumerate(csv.reader(stream), start=1):
            expected = next(images, None)
            if len(row) != len(COLUMNS) or row[0] != one_line(expected or ""):
                raise AuditError(
                    f"{path}: row {done} is for {row[0] if row else 'nothing'!r}, but the "
                    f"manifest's row {done} is {expected!r}: results of another manifest? "
                    "choose another --out")
    return done


def resume_lines(path: Path, images: Iterator[str],
                 columns: tuple[str, ...] = MULTI_COLUMNS) -> int:
    """``resume`` for a file of ``columns`` (``MULTI_COLUMNS``, or a detection audit's),
    the row number last: how many manifest rows it holds whole.
    The last row found is cut off too (a crash may have written only some of its lines;
    it is run again)."""
    if not path.exists():
        return 0
    _cut_partial_line(path)
    header = ",".join(columns) + "\n"
    with open(path, "rb+") as stream:
        first = stream.readline().decode("utf-8")
        if not first:
            return 0
        if first != header:
            kind = "multi-label or segmentation" if columns == MULTI_COLUMNS else "detection"
            raise AuditError(f"{path}: not an onnxcam {kind} audit's results file (header "
                             "differs); choose another --out")
        done, start = 0, stream.tell()  # rows whole so far; where the current row begins
        expected = ""
        for line in iter(stream.readline, b""):
            cells = next(csv.reader([line.decode("utf-8")]))
            if len(cells) != len(columns) or not cells[-1].isdigit():
                raise AuditError(f"{path}: a line without its row number; choose another --out")
            row = int(cells[-1])
            if row == done + 1:  # the row before this one is whole
                done, start = row, stream.tell() - len(line)
                expected = ""
            if row != done:
                raise AuditError(f"{path}: rows out of order at row {row}; choose another --out")
            expected = expected or one_line(next(images, None) or "")
            if cells[0] != expected:
                raise AuditError(f"{path}: row {row} is for {cells[0]!r}, but the manifest's "
                                 f"row {row} is {expected!r}: results of another manifest? "
                                 "choose another --out")
        stream.truncate(start)
    return done


def _cut_partial_line(path: Path) -> None:
    """Truncate ``path`` after its last newline (a crash can leave half a line)."""
    with open(path, "rb+") as stream:
        size = stream.seek(0, os.SEEK_END)
        end = size
        block = 4096
        while end > 0:
            start = max(0, end - block)
            stream.seek(start)
            chunk = stream.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            stream.truncate(keep)


def read_results(path: Path) -> Iterator[ResultRow]:
    """The rows of results.csv, one at a time."""
    with open(path, newline="", encoding="utf-8") as stream:
        yield from csv.DictReader(stream)


def read_heatmap(reference: str, out: Path) -> np.ndarray:
    """A row's raw map: ``heatmap`` in results.csv is relative to ``out``, or a URL in
    the store (distributed audits)."""
    data = (read_source(reference, DEFAULT_LIMITS) if "://" in reference
            else (out / reference).read_bytes())
    return np.load(io.BytesIO(data), allow_pickle=False)

