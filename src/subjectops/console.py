"""The one rich Console every module prints progress and messages to (stderr, so stdout stays data), and progress
that reads the same in a terminal and in a file.

In a terminal, progress is rich's live bar. Piped to a file (CI, nohup, pod logs) a live bar is redrawn nowhere and
only its last state would reach the file, so `progress` gives `LineProgress` there: a plain line every `every` units
with the elapsed time and an ETA. Rich writes no color codes when its console is not a terminal."""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
T = TypeVar("T")


def log(message: str) -> None:
    """One line of the run's log as it is (no markup: prompts and paths may hold brackets), never wrapped at the
    console's width (a file's lines are read whole)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def duration(seconds: float) -> str:
    """`4.2 s`, `3 min 05 s`, `1 h 02 min`: durations a person reads in a log."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """`what: started` and `what: finished in 12.3 s` (or `failed after ...`) around the block."""
    log(f"{what}: started")
    start = time.monotonic()
    try:
        yield
    except BaseException:
        log(f"{what}: failed after {duration(time.monotonic() - start)}")
        raise
    log(f"{what}: finished in {duration(time.monotonic() - start)}")


class LineProgress:
    """rich Progress's `add_task`/`update`/`advance` for a console that is not a terminal: a line each time a task
    completes a multiple of `every` units (and at its total), with its text fields, the elapsed time and an ETA from
    the rate since the task was added (a resumed task's earlier units do not count toward the rate)."""

    def __init__(self, every: int = 1):
        self.every = max(1, every)
        self.tasks: list[dict] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: int = 0, **fields) -> int:
        self.tasks.append({"description": description, "total": total, "completed": completed, "start": completed,
                           "started": time.monotonic(), "fields": fields})
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, advance: float | None = None, completed: float | None = None, **fields) -> None:
        t = self.tasks[task]
        t["fields"].update(fields)
        before = t["completed"]
        t["completed"] = completed if completed is not None else before + (advance or 0)
        crossed = int(t["completed"]) // self.every > int(before) // self.every
        if t["completed"] > before and (crossed or t["completed"] == t["total"]):
            log(self.line(t))

    @staticmethod
    def line(t: dict) -> str:
        done, total = int(t["completed"]), t["total"]
        elapsed = time.monotonic() - t["started"]
        text = " ".join(str(v) for v in t["fields"].values() if v not in (None, ""))
        parts = [f"{t['description']}: {done}/{int(total)}" if total else f"{t['description']}: {done}"]
        if text:
            parts.append(text)
        timing = f"{duration(elapsed)} elapsed"
        if total and done < total and done > t["start"]:
            timing += f", ETA {duration(elapsed / (done - t['start']) * (total - done))}"
        return " ".join(parts) + f" ({timing})"


def counted_columns(field: str) -> tuple:
    """A live bar's columns for counted work with one text field (the loss, the last score): description, bar,
    done/total, the field, elapsed time and ETA."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(f"{{task.fields[{field}]}}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


def progress(*columns, every: int = 1, transient: bool = False, disable: bool = False) -> Progress | LineProgress:
    """rich's live bar (with `columns`, or its default ones) in a terminal; `LineProgress(every)` otherwise."""
    if disable or console.is_terminal:
        return Progress(*columns, console=console, transient=transient, disable=disable)
    return LineProgress(every)


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """rich's `track` on this console (stderr), as lines when it is not a terminal."""
    with progress(transient=True) as shown:
        task = shown.add_task(description, total=total)
        for item in items:
            yield item
            shown.advance(task)
