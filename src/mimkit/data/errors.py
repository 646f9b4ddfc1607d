"""Data errors and the report of files that could not be used.

Nothing is dropped silently: files that cannot be opened while scanning a folder, and files that fail to
decode later (in DataLoader workers), are counted with their paths. With ``data.on_error="error"`` the first
one raises a :class:`DataError` naming the file and the reason; with ``"skip"`` it is excluded (scan time)
or replaced by a deterministic other sample (load time) and recorded here.

Workers are separate processes, so load-time failures are appended, one line each, to
``<report_dir>/data_load_errors.tsv``; :meth:`DataReport.load_errors` reads them back.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

LOAD_ERRORS_FILE = "data_load_errors.tsv"
REPORT_FILE = "data_report.json"


_WORKER_ORIGIN = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.\nOriginal Traceback")


class DataError(RuntimeError):
    """A data problem (missing dataset, unreadable file, inconsistent channels); the message names the cause.

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's whole traceback
    as the message; ``str()`` then gives the original message (and which worker), so a command's
    ``error:`` line stays the one clear line it is everywhere else.
    """

    def __str__(self) -> str:
        text = super().__str__()
        origin = _WORKER_ORIGIN.match(text)
        if not origin:
            return text
        name = origin.group(1)
        lines = text.rstrip("\n").split("\n")
        for k in range(len(lines) - 1, -1, -1):  # the exception line: "<module>.<Name>: message"
            head, sep, rest = lines[k].partition(": ")
            if sep and head.rsplit(".", 1)[-1] == name and not lines[k].startswith(" "):
                message = "\n".join([rest, *lines[k + 1:]])
                return f"{message} (in DataLoader worker {origin.group(2)})"
        return text


class ChannelMismatchError(DataError):
    """An image whose channel count differs from the dataset's: a data-set problem, never skipped."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass
class DataReport:
    """Counts and paths of files that could not be used. Picklable; shared by train and val datasets."""

    source: str = ""
    scanned: int = 0  # files looked at (folder sources) or items in the source
    usable: int = 0  # files kept after scanning
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while scanning
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why): non-image side files
    notes: list[str] = field(default_factory=list)  # what was adapted to the data (e.g. channel conversion)
    report_dir: str | None = None  # where workers append load-time failures
    local_errors: dict[str, str] = field(default_factory=dict)  # load-time failures seen by this process

    # ---------------------------------------------------------------- load-time failures (any process)
    @property
    def load_errors_path(self) -> Path | None:
        return Path(self.report_dir) / LOAD_ERRORS_FILE if self.report_dir else None

    def load_errors(self) -> list[tuple[str, str]]:
        """(path, reason) of files that failed to decode at load time, deduplicated, in first-seen order."""
        p = self.load_errors_path
        if p is None:  # no shared file: only what this process saw (workers' failures were only warned about)
            return list(self.local_errors.items())
        if not p.is_file():
            return []
        seen: dict[str, str] = {}
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            path, _, reason = line.partition("\t")
            if path and path not in seen:
                seen[path] = reason
        return list(seen.items())

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict:
        load = self.load_errors()
        return {
            "source": self.source,
            "scanned": self.scanned,
            "usable": self.usable,
            "unreadable_count": len(self.unreadable),
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
            "load_error_count": len(load),
            "load_errors": [{"path": p, "reason": r} for p, r in load],
            "ignored_count": len(self.ignored),
            "ignored": [{"path": p, "reason": r} for p, r in self.ignored],
            "notes": list(self.notes),
        }

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.load_errors()

    def summary(self, max_paths: int = 5) -> str:
        """A few human-readable lines for the console."""
        load = self.load_errors()
        lines = [f"data[{self.source}]: {self.usable} usable of {self.scanned} scanned"]
        lines += [f"  note: {n}" for n in self.notes]
        for title, items in (("unreadable (excluded)", self.unreadable), ("failed at load time (replaced)", load),
                             ("ignored non-image files", self.ignored)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {p}: {r}" for p, r in items[:max_paths]]
                if len(items) > max_paths:
                    lines.append(f"    ... and {len(items) - max_paths} more (see {REPORT_FILE})")
        return "\n".join(lines)

    def write(self, run_dir: str | Path) -> Path:
        """Write ``data_report.json`` (scan results plus load-time failures so far) into run_dir."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        out = run_dir / REPORT_FILE
        out.write_text(json.dumps(self.to_dict(), indent=2))
        return out


# -------------------------------------------------------------------- per-process recording
_warned: set[str] = set()


def record_load_error(report_dir: str | None, path: str, reason: str) -> None:
    """Append one failure line (atomic O_APPEND write) and warn once per file in this process.

    Also skips the warning when another process already recorded the same path in the file.
    """
    reason = _one_line(reason)
    already = path in _warned
    if report_dir:
        log = Path(report_dir) / LOAD_ERRORS_FILE
        if not already and log.is_file():
            already = any(line.split("\t", 1)[0] == path for line in log.read_text(errors="replace").splitlines())
        if not already:
            log.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{path}\t{reason}\n".encode("utf-8", errors="replace"))
            finally:
                os.close(fd)
    if not already:
        warnings.warn(f"skipping unreadable image {path}: {reason} (data.on_error=skip)", RuntimeWarning, stacklevel=3)
    _warned.add(path)
