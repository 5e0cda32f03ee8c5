"""Files written whole or not at all, the Markdown tables they hold, and the scripts' command line.

Staging writes folders and files beside their destinations and moves them into place together
when its block ends, so that a reader, an interruption or a full disk never leaves half a file;
check_destination refuses a bad destination before any work is done. CommandLine is the
scripts' argument parser, whose usage errors are one line.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import reprlib
import shutil
import typing
from pathlib import Path
from typing import Any


class CommandLine(argparse.ArgumentParser):
    """The scripts' argument parser: the script's docstring is its help, and a usage error is one
    line saying what is wrong (argparse would print its whole usage block first)."""

    def __init__(self, description: str | None):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")

    def check_range(self, flag: str, value: float, low: float, high: float) -> None:
        """A usage error unless low <= value <= high (which NaN never is)."""
        if not low <= value <= high:
            number = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # ints in full: 2147483647
            self.error(f"{flag} must be {number(low)} to {number(high)}, got {number(value)}")

    def checked(self, flag: str, check: typing.Callable[..., Any], *args: object) -> Any:
        """What check(*args) returns; its ValueError becomes a usage error naming the flag."""
        try:
            return check(*args)
        except ValueError as error:
            self.error(f"{flag}: {error}")


def check_destination(path: str | Path, files: tuple[str, ...] | None) -> None:
    """Raise ValueError unless Staging may write path: nothing is there yet, or what it would replace
    is (with files) a folder holding only those files or (without) a file, and no file stands in the
    way of its parent folders. Scripts call it before any work, so that a bad --out fails at once."""
    path = Path(path)
    if path.name in ("", ".."):
        raise ValueError(f"{path} names no folder or file to write: give a path such as data/demo")
    nearest = next(parent for parent in path.parents if parent.exists())
    if not nearest.is_dir():
        raise ValueError(f"cannot write {path}: {nearest} is a file, not a folder")
    try:  # a folder may refuse new files (read-only, /proc): found out now, not after the work
        probe = nearest / f".write-probe-{os.getpid()}-{os.urandom(4).hex()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        raise ValueError(f"cannot write {path}: {nearest} takes no new files ({error.strerror or error})") from None
    if files is None and os.path.isdir(path):
        raise ValueError(f"{path} is a folder, where a file is to be written: move it away")
    if files is None or not os.path.lexists(path):
        return
    if not path.is_dir():
        raise ValueError(f"{path} is a file, where a folder is to be written: choose another path")
    others = sorted(entry.name for entry in path.iterdir() if entry.name not in files)
    if others:
        raise ValueError(
            f"{path} is replaced whole when written, and it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''} besides {', '.join(files)}: choose another folder or move them away"
        )


def remove(path: Path) -> None:
    """Delete a file, a link or a folder with everything in it, as far as possible."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


class Staging:
    """Writes folders and files beside their destinations, then moves them all into place together,
    so that each is written whole or not at all. Its block writes into the temporary paths that
    folder() and file() hand out; when the block ends they replace what was at their destinations
    (see check_destination), and if it raises they are removed with any parent folders made for
    them. If a move fails, those already made are undone: what was there before is put back."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temporary path, destination)
        self.made: list[Path] = []  # parent folders made for the destinations, outermost first

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def folder(self, path: str | Path, files: tuple[str, ...]) -> Path:
        """A new empty folder in which to write the files (these only) of the folder path."""
        return self._stage(Path(path), files)

    def file(self, path: str | Path) -> Path:
        """A new empty file in which to write the file path."""
        return self._stage(Path(path), None)

    def _stage(self, path: Path, files: tuple[str, ...] | None) -> Path:
        check_destination(path, files)
        for parent in reversed(path.parents):
            if not parent.exists():
                parent.mkdir()
                self.made.append(parent)
        remove_left_by_the_dead(path)
        # A new name beside the destination, made as open() and mkdir() make any file or folder (the
        # umask applies, where mkstemp's and mkdtemp's would be private).
        name = path.with_name(f".{path.name}.partial-{os.getpid()}-{os.urandom(4).hex()}")
        if files is None:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        else:
            name.mkdir()
        self.staged.append((name, path))
        return name

    def commit(self) -> None:
        """Move everything staged into place (what the block's end does)."""
        renames: list[tuple[Path, Path]] = []  # (from, to) made so far, undone in reverse order if one fails
        older: list[Path] = []  # where what was at the destinations went
        try:
            for temporary, path in self.staged:
                if temporary.is_file():
                    with open(temporary, "rb") as written:  # on disk before it takes the destination's name
                        os.fsync(written.fileno())
                if os.path.lexists(path):
                    older.append(temporary.with_name(temporary.name + ".older"))
                    if temporary.is_file() and kept_as_hard_link(path, older[-1]):
                        os.rename(temporary, path)
                        renames.append((path, older[-1]))  # undone in one step too: the old file over the new
                        continue
                    os.rename(path, older[-1])
                    renames.append((path, older[-1]))
                os.rename(temporary, path)
                renames.append((temporary, path))
        except BaseException:
            for source, target in reversed(renames):
                os.rename(target, source)
            self.discard()
            raise
        for path in older:
            remove(path)
        self.staged, self.made = [], []

    def discard(self) -> None:
        """Remove everything staged and the parent folders made for it (what an exception does)."""
        for temporary, _ in self.staged:
            remove(temporary)
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                folder.rmdir()
        self.staged, self.made = [], []


def read_json(path: Path, kind: type, description: str) -> Any:
    """The JSON value in path, which must be of kind (list or dict); ValueError naming the file if not."""
    try:
        value = json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(value, kind):
        raise ValueError(f"{path} must hold {description}, not {reprlib.repr(value)}")
    return value


def kept_as_hard_link(path: Path, older: Path) -> bool:
    """Whether the plain file path is now also older, a hard link: then a new file replaces path in
    one rename, so that a reader opens either the old or the new one, and older is what to put back
    if need be. False where path is not a plain file or the file system has no hard links."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        os.link(path, older)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path, *, wait: bool) -> typing.Iterator[typing.IO[str] | None]:
    """Hold an exclusive lock on the file path (made, with its folders, if need be) for the block,
    yielding the open file; None where another process holds it and wait is False. The operating
    system drops the lock when the file is closed or its process ends, however it ends, so a crash
    leaves no stale lock behind. (The filelock package truncates the file on every attempt, which
    would erase what a holder wrote there about itself.)"""
    path.parent.mkdir(parents=True, exist_ok=True)  # exist_ok: another process may make it at once
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield file


def markdown_table(
    header: typing.Sequence[str], rows: typing.Iterable[typing.Sequence[object]], *, numbers_from: int | None = None
) -> str:
    """A Markdown table of the rows under the header, each cell as str() gives it; the columns from
    numbers_from on are aligned right, as columns of numbers read best."""
    align = ["---" if numbers_from is None or i < numbers_from else "---:" for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
    return "\n".join([line(header), "|" + "|".join(align) + "|", *map(line, rows)])


def remove_left_by_the_dead(path: Path) -> None:
    """Clear up after a writer of path that was killed (kill -9, a power cut): the partial files and
    folders Staging names after their writer's process, where that process is no longer running,
    are removed, but for what was at path before: killed between moving it aside and moving the new
    one in, the writer left path empty, and the old one is put back."""
    for left in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        writer = left.name.rsplit(".partial-", 1)[1].split("-")[0]
        if writer.isdigit() and not process_running(int(writer)):
            if left.name.endswith(".older") and not os.path.lexists(path):
                os.rename(left, path)
            else:
                remove(left)


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: delivers nothing, says whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def file_digest(*paths: Path) -> str:
    """A short SHA-256 of the files' bytes, in order: what tells one split or teacher from another."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
