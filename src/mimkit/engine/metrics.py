"""metrics.csv: one row per logged step, columns growing as metrics appear, rewound on resume and rollback."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsCSV:
    """Append-only CSV whose columns grow as new metrics appear (the file is rewritten only then).

    On resume, rows after the resumed step are dropped: they came from steps the resumed run repeats.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.columns: list[str] = ["step"]
        rows: list[dict] = []
        if self.path.is_file() and resume_step is not None:
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or ["step"])
                rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict]) -> None:
        from mimkit.engine.checkpoint import atomic_write  # a kill mid-rewrite must not lose rows

        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self.columns]
        if new:
            with open(self.path, newline="") as fh:
                old_rows = list(csv.DictReader(fh))
            self.columns += new
            self._rewrite(old_rows)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(row)


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.csv as a list of dicts with floats (empty cells dropped), for tests and reports."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.append({k: (int(float(v)) if k == "step" else float(v)) for k, v in row.items() if v not in ("", None)})
    return out
