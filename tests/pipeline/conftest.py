"""Brokers for the pipeline tests: a private Redis, and a private virtual host on the machine's RabbitMQ."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import RedisServer

#: The machine's RabbitMQ (``.ci/run`` starts it when it does not answer).
RABBITMQ = "127.0.0.1:5672"


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl")
    assert exe, "rabbitmqctl is not installed (Debian package rabbitmq-server; .ci/run installs it)"
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()[:300]}"


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """An AMQP URL on a fresh virtual host of the machine's RabbitMQ, deleted afterwards (nothing shared)."""
    vhost = f"preread-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each production broker in turn: a private Redis, then a private RabbitMQ virtual host."""
    if request.param == "redis":
        server = RedisServer(tmp_path / "redis").start()
        try:
            yield server.url
        finally:
            server.kill()
    else:
        yield request.getfixturevalue("rabbitmq_url")
