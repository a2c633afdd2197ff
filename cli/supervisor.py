"""The one process supervisor: start children, restart them when they die, give up when they keep failing.

Used by ``preread run`` (listener, render and infer workers as commands) and by ``preread listen
--workers N`` (listener processes sharing one socket). A child that exits is started again after
:data:`RESTART_BACKOFF_S`; one that fails the same way (same exit code, same last line of output)
:data:`GIVE_UP_AFTER` times in a row is given up on, and :meth:`Supervisor.poll` returns the reason.
Every child is the leader of its own process group and gets SIGTERM when the supervisor dies
(``PR_SET_PDEATHSIG``), so stopping the supervisor in any way leaves no orphan behind: on stop, each
child gets SIGTERM, then whatever is left of its process group SIGKILL.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from preread.cli.errors import OperatorError

log = logging.getLogger(__name__)

#: Least seconds between two starts of one child.
RESTART_BACKOFF_S = 2.0
#: Identical failures in a row after which a child is given up on.
GIVE_UP_AFTER = 5
#: A child that ran this long before it failed starts a new count.
HEALTHY_AFTER_S = 60.0
#: Seconds a child gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies (Linux), so no child outlives the supervisor."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _new_group_dying_with_parent() -> None:
    """``preexec_fn`` of command children: own process group (a terminal's SIGHUP/SIGINT reach only us)."""
    os.setpgid(0, 0)
    die_with_parent()


class Handle(Protocol):
    """What the supervisor needs of a running child."""

    @property
    def pid(self) -> int | None: ...

    def exit_code(self) -> int | None: ...

    def wait(self, timeout: float) -> bool: ...


@dataclass
class _PopenHandle:
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


@dataclass
class _ProcessHandle:
    proc: multiprocessing.process.BaseProcess

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def exit_code(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float) -> bool:
        self.proc.join(timeout)
        return self.proc.exitcode is not None


class Child:
    """One supervised child: how to start it, where its output goes, how it has been failing."""

    def __init__(self, name: str, start: Callable[[], Handle], log_file: Path | None = None, *, own_group: bool = False) -> None:
        self.name, self._start, self.log_file, self.own_group = name, start, log_file, own_group
        self.handle: Handle | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.failure: tuple[int, str] | None = None  # the last failure: exit code, last line of output
        self.same_failures = 0
        self._log_offset = 0

    def start(self) -> None:
        """Start (or start again) the child."""
        if self.log_file is not None:
            self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.handle = self._start()
        self.started_at = time.monotonic()
        log.info("%s started (pid %s)", self.name, self.handle.pid)

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None

    def alive(self) -> bool:
        return self.handle is not None and self.handle.exit_code() is None

    def last_line(self) -> str:
        """The last non-empty line the child wrote to its log since it was started."""
        if self.log_file is None or not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as f:
            f.seek(self._log_offset)
            tail = f.read()[-4096:].decode("utf-8", "replace")
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def record_exit(self, code: int) -> str:
        """Count this exit; return its reason (the child's last line, else its exit code)."""
        line = self.last_line()
        reason = line or (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        ran_for = time.monotonic() - self.started_at
        signature = (code, line)
        if code == 0 or ran_for >= HEALTHY_AFTER_S or signature != self.failure:
            self.same_failures = 0
        self.failure = signature if code != 0 else None
        if code != 0:
            self.same_failures += 1
        return reason

    def terminate(self) -> None:
        """SIGTERM to the child (a warm shutdown: running work finishes)."""
        if self.alive() and self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float) -> None:
        """Wait for the child to stop; kill it after ``timeout``; then kill what is left of its group."""
        if self.handle is None or self.pid is None:
            return
        if not self.handle.wait(max(0.0, timeout)):
            log.warning("%s did not stop in time; killing it", self.name)
            _kill(self.pid)
            self.handle.wait(5.0)
        if self.own_group:
            _killpg(self.pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _killpg(pgid: int) -> None:
    """SIGKILL to the rest of a child's process group (its own children), if any are left."""
    try:
        if pgid != os.getpgid(0):
            os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def command_child(name: str, argv: list[str], log_file: Path | None = None, env: dict[str, str] | None = None) -> Child:
    """A child running ``argv`` in its own process group, output to ``log_file`` (else to ours)."""

    def start() -> Handle:
        if log_file is None:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_new_group_dying_with_parent, env=env)
        else:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "ab") as out:
                proc = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=_new_group_dying_with_parent, env=env,
                )
        return _PopenHandle(proc)

    return Child(name, start, log_file, own_group=True)


def process_child(name: str, target: Callable[..., Any], args: tuple[Any, ...]) -> Child:
    """A child running ``target(*args)`` in a spawned Python process (it shares our process group)."""
    ctx = multiprocessing.get_context("spawn")

    def start() -> Handle:
        proc = ctx.Process(target=target, args=args, name=f"preread-{name}")
        proc.start()
        return _ProcessHandle(proc)

    return Child(name, start)


class GaveUp(OperatorError):
    """A child failed the same way :data:`GIVE_UP_AFTER` times in a row."""

    def __init__(self, child: str, reason: str, times: int) -> None:
        super().__init__(f"{child} failed {times} times in a row: {reason}")
        self.child, self.reason, self.times = child, reason, times


class Supervisor:
    """Children started together, restarted when they die, stopped together."""

    def __init__(self, children: list[Child], *, backoff_s: float = RESTART_BACKOFF_S, give_up_after: int = GIVE_UP_AFTER) -> None:
        self.children = children
        self.backoff_s, self.give_up_after = backoff_s, give_up_after
        self._down_since: dict[str, float] = {}

    def start(self) -> None:
        for child in self.children:
            child.start()

    def poll(self) -> None:
        """Restart children that exited (after the backoff); raise :class:`GaveUp` for one that keeps failing."""
        now = time.monotonic()
        for child in self.children:
            if child.handle is None or child.alive():
                continue
            if child.name not in self._down_since:
                code = child.handle.exit_code()
                assert code is not None
                reason = child.record_exit(code)
                self._down_since[child.name] = now
                if child.same_failures >= self.give_up_after:
                    raise GaveUp(child.name, reason, child.same_failures)
                log.warning("%s (pid %s) exited: %s; restarting", child.name, child.pid, reason)
            if now - child.started_at < self.backoff_s:
                continue
            del self._down_since[child.name]
            child.restarts += 1
            child.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to every child, then wait (all together, at most ``timeout``), then kill what is left."""
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            child.finish(deadline - time.monotonic())
