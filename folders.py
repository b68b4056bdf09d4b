"""Folders: write an output folder whole or not at all, one run at a time; recover from dead runs.

Usage:
    with Staged(out, "--out", log=rep.log) as stage:  # OUT writable? lock, tidy up dead runs
        ...                                          # the work; files go to stage.tmp
        stage.commit(write)                          # write(stage.tmp), then swap it in as OUT
Used by `preprocessing.pipeline.preprocess` (the processed folder) and `synthetic.synthesize` (an
extract); `check_writable` serves outputs written file by file (evaluate's RUN/eval), `Locked` a
folder that one command at a time adds files to (a pretraining RUN, a demo OUT), and `replace_file`
writes one file whole (checkpoints, result files), under a lock of its own (`Lock.waiting`) where
several runs update it. Beside OUT live, for the length of a run, a lock `.OUT.lock` (the writer's
PID) and the staging folder `.OUT.tmp-PID`; a swap briefly renames the old OUT to `.OUT.old-PID`; a
file is written as `.NAME.tmp-PID` beside it. A run killed outright (kill -9, power loss) leaves
those behind: the next run removes the ones whose PID is no longer alive, and completes (or undoes)
a swap cut between its two renames.
A `--out` that is a symlink is written through: the link stays and its target is replaced. It also
defines `InputError`, the one-line error for bad user input that every stage raises (here, in the
lowest module, so that every other module can import it). Imports the stdlib only.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

# also synth's old `OUT.tmp-PID`
LEFTOVER = re.compile(r"\.?(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")
# a write failed whatever the file
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# seconds a run waits for another run's update of a shared file (results.csv: a read, a merge and a
# rename, milliseconds) before it gives up in one line
FILE_LOCK_WAIT = 120.0
STALE = "stale"       # Lock._take_over removed a lock whose process is gone


class InputError(Exception):
    """Bad user input: the message is one actionable line naming the file, column or row."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it cleans up exactly as after Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside, SIGTERM raises `Terminated` where the program is (main thread only), so a terminated
    command cleans up (temporary files, staging folders) exactly as after Ctrl-C."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


def resolve(out: Path) -> Path:
    """OUT as an absolute path, through a symlink (the link is kept and its target written)."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (on systems other than POSIX: assumed alive, so nothing is
    removed)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # alive, owned by someone else
        return True
    return True


def cannot_write(path: Path, err: OSError, option: str) -> InputError:
    """The one-line InputError for an output that cannot be written (read-only, not a folder, disk
    full)."""
    reason = err.strerror or str(err) or type(err).__name__
    where = f": {err.filename}" if err.filename and str(err.filename) != str(path) else ""
    return InputError(f"{path}: cannot write there ({reason}{where}); free some space, fix the "
                      f"permissions or choose another {option}")


def check_writable(folder: Path, option: str) -> Path:
    """Create `folder` if needed and write a probe file in it, before any work: an InputError
    otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise cannot_write(folder, err, option) from None
    return folder


class Lock:
    """`.OUT.lock` holding the writer's PID, created exclusively; a lock whose process is gone is
    taken over. While a live process holds it, a second run is refused in one line, or with `wait`
    seconds, waits for it (a shared file's update: `Lock.waiting`)."""

    def __init__(self, out: Path, option: str, wait: float = 0.0):
        self.path, self.out, self.option = out.with_name(f".{out.name}.lock"), out, option
        self.wait = wait

    @classmethod
    def waiting(cls, path: Path, option: str = "--run") -> Lock:
        """The lock of one file that several runs update (read, merge, replace), waited for."""
        return cls(Path(path), option, wait=FILE_LOCK_WAIT)

    def __enter__(self):
        deadline, stale = time.monotonic() + self.wait, 0
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._take_over()
                stale += holder == STALE
                if stale >= 3:
                    raise InputError(f"{self.out}: cannot take the lock {self.path}; remove it if "
                                     "no run is writing there") from None
                if holder and holder != STALE:
                    if time.monotonic() >= deadline:
                        raise self._busy(holder) from None
                    time.sleep(0.005)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self

    def _take_over(self) -> str:
        """Remove a stale lock (STALE), or say who holds a live one ("" when it is gone already)."""
        try:
            text = self.path.read_text().strip()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return ""
        pid = int(text) if text.isdigit() else None
        alive = pid is not None and pid != os.getpid() and pid_alive(pid)
        if (pid is None and age < 10) or alive:
            return f"process {pid}" if pid else "another run"
        self.path.unlink(missing_ok=True)
        return STALE

    def _busy(self, who: str) -> InputError:
        waited = f" (waited {self.wait:g} s)" if self.wait else ""
        return InputError(f"{self.out}: {who} is writing there{waited} (lock {self.path.name}); "
                          f"wait for it to finish or choose another {self.option} (if no run is "
                          "writing, remove the lock)")

    def __exit__(self, *exc):
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass
        return False


def recover(out: Path, log=None) -> None:
    """Tidy up after runs that died beside `out`: a swap cut between its renames (OUT missing,
    `.OUT.old-PID` present) is completed from `.OUT.tmp-PID` when that is there (it is whole by
    then), else undone; then the staging and old folders of dead processes are removed. Call with
    the lock held."""
    found = {}
    for p in out.parent.iterdir() if out.parent.is_dir() else ():
        m = LEFTOVER.fullmatch(p.name)
        if m and m["name"] == out.name and int(m["pid"]) != os.getpid() \
                and not pid_alive(int(m["pid"])):
            found[m["kind"], int(m["pid"])] = p
    for (kind, pid), p in sorted(found.items()):
        if kind == "old" and not os.path.lexists(out):
            whole = found.get(("tmp", pid))
            done = whole is not None and whole.is_dir()
            (whole if done else p).rename(out)
            if log:
                log(f"{out}: {'finished' if done else 'undid'} the folder swap of process {pid}, "
                    "which was killed")
    for p in (p for p in found.values() if p.exists()):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if log:
            log(f"removed {p}, left by a run that died")


def repair(out: Path) -> None:
    """`recover` for a reader that finds OUT missing: only when no live run is writing it."""
    out = resolve(out)
    if out.parent.is_dir():
        try:
            with Lock(out, "--out"):
                recover(out)
        except (InputError, OSError):
            pass


def swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` to `out`, replacing an existing `out` as a whole; if the
    rename fails the old `out` is put back (and `recover` finishes the job after a kill between the
    two renames)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def replace_file(path: Path, write) -> None:
    """`write(tmp)` to a temporary name of this process beside `path` (`.NAME.tmp-PID`), then rename
    it over `path`: a file on disk is always whole, and two runs writing one file never share a
    temporary name. On any failure (a full disk, Ctrl-C) the temporary file is removed before the
    error goes on, and the previous `path` is untouched; the temporary files of writers that died
    (kill -9) are removed by the next write. The file-sized counterpart of `Staged`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    recover(path)


def _is_write_error(err: BaseException, tmp: Path) -> bool:
    if not isinstance(err, OSError):
        return False
    return err.errno in WRITE_ERRNOS or (err.filename is not None
                                         and str(err.filename).startswith(str(tmp)))


def take_lock(lock: Lock) -> None:
    """Create the folder that holds `lock.out` and take the lock: one InputError line when a file
    is in the way, the folder cannot be written or a live run holds the lock."""
    out, option = lock.out, lock.option
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"{out}: {blocker} is a file, not a folder; choose another {option}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    except OSError as err:
        raise cannot_write(out, err, option) from None


class Locked:
    """A folder that one command at a time writes file by file (a pretraining RUN, a demo OUT): its
    lock taken (a second run is refused in one line) and the folder (or, until the run creates it,
    its parent) checked writable, before any work; a run that fails before writing leaves no folder.
    Inside, SIGTERM is raised as `Terminated` (see `Staged`)."""

    def __init__(self, out: Path, option: str):
        self.out, self.option = resolve(out), option
        self.lock, self.terminate = Lock(self.out, option), sigterm_as_interrupt()

    def __enter__(self):
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: is a file, not a folder; choose another {self.option}")
        take_lock(self.lock)
        try:
            with tempfile.TemporaryFile(dir=self.out if self.out.is_dir() else self.out.parent):
                pass
        except OSError as err:
            self.lock.__exit__()
            raise cannot_write(self.out, err, self.option) from None
        self.terminate.__enter__()
        return self

    def __exit__(self, kind, err, tb):
        self.terminate.__exit__(None, None, None)
        self.lock.__exit__()
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            raise cannot_write(self.out, err, self.option) from None
        return False


class Staged:
    """One run writing the folder `out` (see the module docstring). Inside the `with`, SIGTERM is
    raised as `Terminated`, so a terminated run removes its staging folder as an interrupted one
    does."""

    def __init__(self, out: Path, option: str = "--out", log=None):
        self.out, self.option, self.log = resolve(out), option, log
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.lock, self.terminate = Lock(self.out, option), sigterm_as_interrupt()

    def __enter__(self):
        if Path.cwd().resolve().is_relative_to(self.out.resolve()):
            raise InputError(f"{self.out}: is the current folder (or holds it); choose another "
                             f"{self.option}")
        take_lock(self.lock)
        try:
            recover(self.out, self.log)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as err:
            self.lock.__exit__()
            raise cannot_write(self.out, err, self.option) from None
        self.terminate.__enter__()
        return self

    def commit(self, write=None) -> None:
        """`write(self.tmp)` (when given), then swap the staging folder in as OUT."""
        if write is not None:
            write(self.tmp)
        swap_in(self.tmp, self.out)

    def __exit__(self, kind, err, tb):
        self.terminate.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.lock.__exit__()
        if _is_write_error(err, self.tmp):
            raise cannot_write(self.out, err, self.option) from None
        return False
