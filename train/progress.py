"""Progress bars (rich) with elapsed time and ETA for every long step of training/evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(console: Console | None = None, *, disable: bool = False) -> Progress:
    """A progress display: description, bar, done/total, elapsed and remaining time."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


class Step:
    """A task on a (possibly absent) progress display."""

    def __init__(self, progress: Progress | None, description: str, total: float | None) -> None:
        self.progress = progress
        self.task: TaskID | None = (
            progress.add_task(description, total=total, status="")
            if progress is not None
            else None
        )

    def advance(self, amount: float = 1.0) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, amount)

    def status(self, text: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, status=text)

    def total(self, total: float, completed: float | None = None) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, total=total, completed=completed)

    def finish(self) -> None:
        if self.progress is not None and self.task is not None:
            task = self.progress.tasks[self.progress.task_ids.index(self.task)]
            if task.total is not None:
                self.progress.update(self.task, completed=task.total)


@contextlib.contextmanager
def step(progress: Progress | None, description: str, total: float | None) -> Iterator[Step]:
    """Context manager around :class:`Step` that completes the bar on exit."""
    handle = Step(progress, description, total)
    try:
        yield handle
    finally:
        handle.finish()
