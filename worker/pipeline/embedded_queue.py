"""The embedded queue: kombu's filesystem transport with whole, durable messages, polled fast.

kombu's stock ``filesystem://`` transport writes each message file in place under its final
``.msg`` name, so a consumer that lists the folder while the producer writes can take the file
half-written (polling every 0.1 s made that happen); it moves a taken file to the system temp
folder and deletes it before the task has run, so a worker killed mid-task loses the message
(only the reconciler brings the study back); and it polls once a second. This transport
(``preread-fs://``, registered under kombu's transport aliases) changes exactly that:

* **publish**: :func:`preread.ingest.storage.files.write_atomic`: a temporary name the
  listing ignores (``.<name>.<hex>.tmp``), fsync of the file when ``sync`` (``PREREAD_SYNC_WRITES``),
  ``rename`` into place, fsync of the folder. A published message is whole and survives a
  killed process (and, with ``sync``, power loss) before ``send_task`` returns.
* **take**: ``rename`` into this process's claim folder ``claimed/<owner>/`` (one consumer wins
  a race; the loser's rename fails). The file stays there until the message is acknowledged,
  rejected or restored. Each owner holds a POSIX lock on ``claimed/<owner>.lock`` for its life;
  a consumer that can take another owner's lock knows that process has died and moves its
  claimed files back into the queue, so a message taken but not acknowledged is delivered again.
* **poll**: every ``polling_interval`` (:data:`FAST_POLL_S`) while messages have come within
  :data:`BUSY_FOR_S`, then slower the longer the queue stays idle, up to ``idle_polling_interval``
  (:data:`IDLE_POLL_S`): a queue that stays empty costs little CPU, and one that is working
  hands each message on within a fraction of a tenth of a second.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from time import monotonic, sleep
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

from preread.ingest.storage.files import fsync_dir, sweep_temporary, write_atomic

log = logging.getLogger(__name__)

#: The URL scheme of this transport (``preread-fs://``); the broker URL the embedded default uses.
SCHEME = "preread-fs"
#: Seconds between polls while the queue is busy.
FAST_POLL_S = 0.05
#: Seconds between polls after a long idle time (at most what a first study after a quiet spell waits per hop).
IDLE_POLL_S = 0.25
#: Seconds after the last message during which polling stays fast.
BUSY_FOR_S = 60.0
#: Seconds between looks for claims of dead consumers (also done at a consumer's first poll).
RECOVER_EVERY_S = 30.0
#: Folder (inside the queue folder) holding each consumer's taken, unacknowledged messages.
CLAIMED = "claimed"
#: Folder (inside the queue folder) where a message file that is not a message is set aside.
UNREADABLE = "unreadable"


def poll_pause(idle_s: float, fast: float = FAST_POLL_S, slow: float = IDLE_POLL_S, busy_for: float = BUSY_FOR_S) -> float:
    """Seconds to wait before the next poll, ``idle_s`` after the last message: fast, then growing to ``slow``."""
    if idle_s <= busy_for:
        return fast
    return min(slow, fast * (idle_s / busy_for))  # grows with the idle time: slow after slow/fast * busy_for


class _Owner:
    """This process's claim folder, locked for the process's life (a fork gets its own)."""

    def __init__(self, claimed: Path) -> None:
        self.pid = os.getpid()
        self.token = f"{socket.gethostname()}-{self.pid}-{secrets.token_hex(4)}"
        claimed.mkdir(exist_ok=True)
        hidden = claimed / f".{self.token}.lock"
        self._lock_fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this process ends
        self.folder = claimed / self.token
        self.folder.mkdir()
        os.rename(hidden, claimed / f"{self.token}.lock")  # visible to recoverers only once locked and made
        fsync_dir(claimed)


_owners: dict[Path, _Owner] = {}
_owners_lock = threading.Lock()


def _owner(claimed: Path) -> _Owner:
    with _owners_lock:
        owner = _owners.get(claimed)
        if owner is None or owner.pid != os.getpid():  # POSIX locks do not pass to a forked child
            owner = _owners[claimed] = _Owner(claimed)
        return owner


def recover_dead_claims(folder: Path, *, own_token: str | None = None) -> int:
    """Move the claimed messages of consumers that died back into ``folder``; returns how many.

    A consumer's lock is free only once its process has ended (POSIX record locks go with the
    process), so a live consumer's claims are never touched.
    """
    claimed = folder / CLAIMED
    try:
        names = os.listdir(claimed)
    except FileNotFoundError:
        return 0
    moved = 0
    for name in names:
        if name.startswith(".") or not name.endswith(".lock") or name[: -len(".lock")] == own_token:
            continue
        lock_path = claimed / name
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # another recoverer finished it
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    continue  # its owner is alive
                raise
            dead = claimed / name[: -len(".lock")]
            for message in sorted(os.listdir(dead)) if dead.is_dir() else []:
                os.rename(dead / message, folder / message)
                moved += 1
            if moved:
                fsync_dir(folder)
            if dead.is_dir():
                os.rmdir(dead)
            try:
                os.unlink(lock_path)
            except FileNotFoundError:
                pass  # a recoverer before us finished it
        finally:
            os.close(fd)
    if moved:
        log.warning("embedded queue: %d messages taken by a consumer that died are queued again", moved)
    return moved


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear whole and stay claimed until acknowledged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claims: dict[str, list[Path]] = {}
        self._claims_lock = threading.Lock()
        self._recovered_at: float | None = None

    @cached_property
    def folder(self) -> Path:
        return Path(self.data_folder_in)

    @cached_property
    def _folder_str(self) -> str:
        return str(self.data_folder_in)

    @property
    def sync(self) -> bool:
        return bool(self.transport_options.get("sync", True))

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]  # kombu's two bases disagree
        """Publish: the message file appears under its ``.msg`` name only complete (and fsynced when ``sync``)."""
        name = f"{int(round(monotonic() * 1000))}_{secrets.token_hex(16)}.{queue}.msg"
        try:
            write_atomic(Path(self.data_folder_out) / name, [str_to_bytes(dumps(payload))], sync=self.sync)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add message {name!r} to the embedded queue: {exc}") from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        """Take the oldest message of ``queue`` into this process's claim folder; Empty when none."""
        self._maybe_recover()
        wanted = f"{queue}.msg"
        names = [n for n in os.listdir(self._folder_str) if n.partition(".")[2] == wanted]
        if not names:
            raise Empty()  # the idle poll: one listdir, nothing else
        names.sort()
        folder = self.folder
        owner = _owner(folder / CLAIMED)
        for name in names:
            claim = owner.folder / name
            try:
                os.rename(folder / name, claim)
            except FileNotFoundError:
                continue  # another consumer took it
            try:
                with open(claim, "rb") as f:
                    payload: dict[str, Any] = loads(bytes_to_str(f.read()))
                tag = str(payload["properties"]["delivery_tag"])
            except (ValueError, KeyError, TypeError) as exc:  # e.g. cut short by the stock transport before an upgrade
                (folder / UNREADABLE).mkdir(exist_ok=True)
                os.rename(claim, folder / UNREADABLE / name)
                log.error("embedded queue: message %s cannot be read (%s); moved to %s", name, type(exc).__name__,
                          folder / UNREADABLE)
                continue
            with self._claims_lock:
                self._claims.setdefault(tag, []).append(claim)
            return payload
        raise Empty()

    def _maybe_recover(self) -> None:
        now = monotonic()
        if self._recovered_at is not None and now - self._recovered_at < RECOVER_EVERY_S:
            return
        self._recovered_at = now
        own = _owners.get(self.folder / CLAIMED)
        try:
            recover_dead_claims(self.folder, own_token=own.token if own is not None and own.pid == os.getpid() else None)
            sweep_temporary(self.folder)  # messages a killed publisher left half-written (older than 10 min)
        except OSError as exc:  # never stops consuming; tried again later
            log.warning("embedded queue: claims of dead consumers not recovered: %s", exc)

    def _settle(self, delivery_tag: str) -> None:
        """The message is done with (acknowledged, rejected, or queued again): drop its claim file."""
        with self._claims_lock:
            paths = self._claims.get(str(delivery_tag))
            path = paths.pop(0) if paths else None
            if paths == []:
                del self._claims[str(delivery_tag)]
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple=multiple)
        self._settle(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue=requeue)  # requeue: published again by _restore, which settles
        if not requeue:
            self._settle(delivery_tag)

    def _restore(self, message: Any) -> None:
        super()._restore(message)  # published again (recover, shutdown with unacknowledged messages) ...
        self._settle(message.delivery_tag)  # ... before the claim goes

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self._settle(message.delivery_tag)
        return message

    def basic_consume(self, queue: str, no_ack: bool, callback: Callable[[Any], Any], consumer_tag: str, **kwargs: Any) -> Any:
        if no_ack:  # nothing will acknowledge these: the claim goes as the message is handed over
            inner = callback

            def callback(message: Any) -> Any:
                self._settle(message.delivery_tag)
                return inner(message)

        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)


_states: dict[str, virtual.BrokerState] = {}
_states_lock = threading.Lock()


class Transport(filesystem.Transport):
    """The embedded queue's transport: :class:`Channel`, polled fast while busy and slower when idle."""

    Channel = Channel
    driver_type = SCHEME
    driver_name = SCHEME

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        options = client.transport_options
        # Declared exchanges and bindings, shared by this process's connections to one queue folder (the
        # stock transport shares one state among all folders: a binding made in one was skipped in another).
        with _states_lock:
            self.state = _states.setdefault(str(options.get("data_folder_in")), virtual.BrokerState())
        self.polling_interval = float(options.get("polling_interval", FAST_POLL_S))
        self.idle_polling_interval = float(options.get("idle_polling_interval", IDLE_POLL_S))
        self.busy_for = float(options.get("busy_for", BUSY_FOR_S))
        self.last_message = monotonic()

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Deliver one message, polling at :func:`poll_pause`'s pace; ``socket.timeout`` after ``timeout``."""
        started = monotonic()
        assert self.cycle is not None
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
            except Empty:
                now = monotonic()
                if timeout is not None and now - started >= timeout:
                    raise socket.timeout() from None
                pause = poll_pause(now - self.last_message, self.polling_interval, self.idle_polling_interval, self.busy_for)
                if timeout is not None:
                    pause = min(pause, max(0.0, started + timeout - now))
                sleep(pause)
            else:
                self.last_message = monotonic()
                return


def register() -> None:
    """Make ``preread-fs://`` a kombu transport (kombu's documented alias table); idempotent."""
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")


register()
