"""The embedded queue (``preread-fs://``): whole messages, each delivered once, none lost to a crash.

Producers and consumers are separate processes on one queue folder, as ``preread run``'s
listener, coordinator and workers are. kombu's stock ``filesystem://`` transport writes a
message in place under its final name: a consumer polling fast takes it half-written (the
stalled-writer test holds that against both transports; on the stock one it must fail).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.transport import filesystem

from preread.ingest.storage import files
from preread.schemas.settings import Settings
from preread.worker.pipeline import embedded_queue
from preread.worker.pipeline.broker import embedded_broker

QUEUE = "render"
SPAWN = multiprocessing.get_context("spawn")


def _connection(data_dir: str, scheme: str | None = None, **options: object) -> Connection:
    """A connection as the pipeline's processes make it (``embedded_broker``), optionally another scheme."""
    url, transport_options = embedded_broker(Settings(data_dir=Path(data_dir)))
    transport_options = {**transport_options, **options}
    if scheme == "filesystem":  # kombu's stock transport on the same folder
        transport_options["processed_folder"] = str(Path(data_dir) / "processed")
        Path(transport_options["processed_folder"]).mkdir(exist_ok=True)
    return Connection(f"{scheme}://" if scheme else url, transport_options=transport_options)


def _queue() -> Queue:
    return Queue(QUEUE, Exchange("preread", type="direct"), routing_key=QUEUE)


def _body(producer: int, seq: int, size: int) -> dict[str, Any]:
    blob = hashlib.sha256(f"{producer}/{seq}".encode()).hexdigest() * (size // 64 + 1)
    return {"producer": producer, "seq": seq, "blob": blob[:size], "sha": hashlib.sha256(blob[:size].encode()).hexdigest()}


def _produce(data_dir: str, producer: int, count: int, size: int, scheme: str | None = None) -> None:
    with _connection(data_dir, scheme) as conn:
        publish = Producer(conn.channel()).publish
        for seq in range(count):
            publish(_body(producer, seq, size), exchange=_queue().exchange, routing_key=QUEUE, declare=[_queue()],
                    serializer="json")


def _consume(data_dir: str, out: str, producers_done: Any, poll: float, scheme: str | None = None) -> None:
    """Take and acknowledge messages until the producers are done and the queue has been quiet for 2 s."""
    got: list[dict[str, Any]] = []

    def on_message(body: dict[str, Any], message: Any) -> None:
        got.append({"producer": body["producer"], "seq": body["seq"],
                    "whole": hashlib.sha256(body["blob"].encode()).hexdigest() == body["sha"]})
        message.ack()

    with _connection(data_dir, scheme, polling_interval=poll, idle_polling_interval=poll) as conn:
        with Consumer(conn, [_queue()], callbacks=[on_message], accept=["json"], prefetch_count=1):
            quiet_since = time.monotonic()
            while not (producers_done.is_set() and time.monotonic() - quiet_since > 2.0):
                try:
                    conn.drain_events(timeout=0.2)
                    quiet_since = time.monotonic()
                except TimeoutError:
                    pass
    Path(out).write_text(json.dumps(got))


def test_many_producers_and_fast_polling_consumers_each_message_arrives_whole_exactly_once(tmp_path: Path) -> None:
    producers, per_producer, consumers = 4, 150, 3
    done = SPAWN.Event()
    takers = [SPAWN.Process(target=_consume, args=(str(tmp_path), str(tmp_path / f"got-{n}.json"), done, 0.001))
              for n in range(consumers)]
    makers = [SPAWN.Process(target=_produce, args=(str(tmp_path), p, per_producer, 48_000)) for p in range(producers)]
    for proc in takers + makers:
        proc.start()
    for proc in makers:
        proc.join(120)
        assert proc.exitcode == 0, "a producer failed"
    done.set()
    for proc in takers:
        proc.join(120)
        assert proc.exitcode == 0, "a consumer failed (a message it took could not be read)"
    got = [m for n in range(consumers) for m in json.loads((tmp_path / f"got-{n}.json").read_text())]
    counts = Counter((m["producer"], m["seq"]) for m in got)
    expected = {(p, s) for p in range(producers) for s in range(per_producer)}
    assert set(counts) == expected, f"{len(expected - set(counts))} messages never arrived"
    assert max(counts.values()) == 1, f"delivered twice: {[k for k, n in counts.items() if n > 1][:5]}"
    assert all(m["whole"] for m in got), "a message arrived cut short"
    assert sum(1 for n in range(consumers) if json.loads((tmp_path / f"got-{n}.json").read_text())) > 1, \
        "the consumers did not share the work (no race was exercised)"
    leftovers = [p.name for p in (tmp_path / "queue").rglob("*") if p.is_file() and p.parent.name != "control"
                 and not p.name.endswith(".lock")]
    assert leftovers == [], f"messages left behind after every one was acknowledged: {leftovers[:5]}"


class _StalledWriter:
    """A writer that stops halfway through a message's bytes until told to go on (a slow disk, a preempted process)."""

    def __init__(self) -> None:
        self.halfway = threading.Event()
        self.resume = threading.Event()

    def write(self, write_bytes: Any, data: bytes) -> int:
        half = len(data) // 2
        done = write_bytes(data[:half])
        self.halfway.set()
        assert self.resume.wait(10)
        return int(done) + int(write_bytes(data[half:]))


def _stall_stock(monkeypatch: pytest.MonkeyPatch, stall: _StalledWriter) -> None:
    """kombu's filesystem transport writes through ``open(...).write``: stall that write."""

    class File:
        def __init__(self, raw: Any) -> None:
            self.raw = raw

        def write(self, data: bytes) -> int:
            return stall.write(self.raw.write, data) if "w" in self.raw.mode else self.raw.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.raw, name)

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self.raw.close()

    monkeypatch.setattr(filesystem, "open", lambda *a, **k: File(builtins.open(*a, **k)), raising=False)


def _stall_ours(monkeypatch: pytest.MonkeyPatch, stall: _StalledWriter) -> None:
    """Ours writes through :func:`files.write_all` (inside ``write_atomic``): stall that write."""
    real = files.write_all
    monkeypatch.setattr(files, "write_all",
                        lambda fd, chunks: stall.write(lambda b: real(fd, [b]), b"".join(bytes(c) for c in chunks)))


@pytest.mark.parametrize("scheme", [
    None,
    pytest.param("filesystem", marks=pytest.mark.xfail(strict=True, reason="kombu's stock transport writes in place: "
                                                        "a consumer takes the message half-written")),
])
def test_a_message_being_written_is_not_offered_until_it_is_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str | None) -> None:
    stall = _StalledWriter()
    (_stall_stock if scheme else _stall_ours)(monkeypatch, stall)
    body = _body(0, 0, 200_000)
    with _connection(str(tmp_path), scheme) as producer_conn, _connection(str(tmp_path), scheme) as consumer_conn:
        channel = consumer_conn.channel()
        _queue()(channel).declare()
        writer = threading.Thread(target=lambda: Producer(producer_conn.channel()).publish(
            body, exchange=_queue().exchange, routing_key=QUEUE, serializer="json"))
        writer.start()
        try:
            assert stall.halfway.wait(10)
            taken_early = channel.basic_get(QUEUE)  # a consumer polling while the producer is halfway
            assert taken_early is None, "a consumer was handed a message its producer had not finished writing"
        finally:
            stall.resume.set()
            writer.join(10)
        message = channel.basic_get(QUEUE)
        assert message is not None and message.decode() == body
        message.ack()


def _take_and_hang(data_dir: str, taken: Any) -> None:
    """Take one message, never acknowledge it, and wait to be killed."""
    with _connection(data_dir) as conn:
        message = None
        while message is None:
            message = conn.channel().basic_get(QUEUE)
            time.sleep(0.01)
        taken.set()
        time.sleep(600)


def test_a_message_taken_by_a_consumer_that_is_killed_is_delivered_again(tmp_path: Path) -> None:
    _produce(str(tmp_path), 7, 1, 1000)
    taken = SPAWN.Event()
    victim = SPAWN.Process(target=_take_and_hang, args=(str(tmp_path), taken))
    victim.start()
    try:
        assert taken.wait(60), "the consumer never took the message"
        with _connection(str(tmp_path)) as conn:
            assert conn.channel().basic_get(QUEUE) is None, "a live consumer's unacknowledged message was handed out again"
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        with _connection(str(tmp_path)) as conn:  # e.g. the worker the supervisor starts again
            message = conn.channel().basic_get(QUEUE)
            assert message is not None, "the message the killed consumer had taken is lost"
            assert (message.decode()["producer"], message.decode()["seq"]) == (7, 0)
            message.ack()
        with _connection(str(tmp_path)) as conn:
            assert conn.channel().basic_get(QUEUE) is None, "acknowledged, yet delivered again"
    finally:
        if victim.is_alive():
            victim.kill()


def test_a_consumer_that_stops_with_a_message_unacknowledged_puts_it_back(tmp_path: Path) -> None:
    _produce(str(tmp_path), 3, 1, 1000)
    with _connection(str(tmp_path)) as conn:
        assert conn.channel().basic_get(QUEUE) is not None  # taken, never acknowledged; the connection closes
    with _connection(str(tmp_path)) as conn:
        message = conn.channel().basic_get(QUEUE)
        assert message is not None and message.decode()["producer"] == 3
        message.ack()
    claimed = [p for p in (tmp_path / "queue" / embedded_queue.CLAIMED).rglob("*.msg")]
    assert claimed == [], "a claim outlived its message"


def test_a_cut_short_message_file_is_set_aside_and_the_next_one_delivered(tmp_path: Path) -> None:
    """E.g. one the stock transport left half-written before an upgrade: it must not stop the queue for good."""
    _produce(str(tmp_path), 1, 1, 1000)
    (tmp_path / "queue" / f"0_{'0' * 32}.{QUEUE}.msg").write_text('{"body": "eyJh')  # sorts first
    with _connection(str(tmp_path)) as conn:
        message = conn.channel().basic_get(QUEUE)
        assert message is not None and message.decode()["producer"] == 1
        message.ack()
    assert [p.name for p in (tmp_path / "queue" / embedded_queue.UNREADABLE).iterdir()] == [f"0_{'0' * 32}.{QUEUE}.msg"]


def test_idle_consumers_slow_down_and_busy_ones_poll_fast() -> None:
    fast, slow, busy = 0.05, 0.25, 60.0
    assert embedded_queue.poll_pause(0.0, fast, slow, busy) == fast
    assert embedded_queue.poll_pause(busy, fast, slow, busy) == fast
    assert fast < embedded_queue.poll_pause(4 * busy, fast, slow, busy) < slow
    assert embedded_queue.poll_pause(3600.0, fast, slow, busy) == slow
