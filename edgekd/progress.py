"""Progress reporting: stages report through this interface; the CLI draws bars, tests stay silent."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Iterator[Task]: ...
    def note(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass


class NullProgress:
    """Reports nothing (library use and tests); notes are kept for inspection."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _NullTask()

    def note(self, message: str) -> None:
        self.notes.append(message)


class RichProgress:
    """Bars on stderr with rich."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.console, transient=False) as bar:
            tid = bar.add_task(description, total=total)

            class _T:
                def advance(self, n: int = 1) -> None:
                    bar.advance(tid, n)

            yield _T()

    def note(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/dim]")
