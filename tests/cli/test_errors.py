"""Operator errors: each expected failure is one or two lines naming the setting and the fix, exit code 2."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from preread.cli.errors import EXIT_OPERATOR, OperatorError, OperatorErrorGroup, explain, mask_url
from tests.conftest import PG_ADMIN_URL, testdata
from tests.support.procs import base_env, preread_argv


def preread(*args: str, cwd: Path | None = None, **settings: object) -> subprocess.CompletedProcess[str]:
    """Our console command as a user runs it."""
    return subprocess.run(
        preread_argv(*args), env=base_env(**settings), capture_output=True, text=True, timeout=300, cwd=cwd
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The non-empty lines of stderr."""
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_operator_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2, one or two lines on stderr, no traceback, every needle in the message."""
    lines = error_lines(result)
    assert result.returncode == EXIT_OPERATOR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert 1 <= len(lines) <= 2, result.stderr
    message = "\n".join(lines)
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture
def busy_port() -> int:
    """A port another program is listening on."""
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_port_in_use_is_one_line_naming_the_port(busy_port: int, tmp_path: Path) -> None:
    result = preread("listen", data_dir=tmp_path / "data", port=busy_port)
    assert_operator_error(result, f"port {busy_port}", "PREREAD_PORT", "in use")


def test_port_in_use_with_listener_processes(busy_port: int, tmp_path: Path) -> None:
    result = preread("listen", "--workers", "2", data_dir=tmp_path / "data", port=busy_port)
    assert_operator_error(result, f"port {busy_port}", "PREREAD_PORT")


def test_debug_keeps_the_traceback(busy_port: int, tmp_path: Path) -> None:
    with_option = preread("--debug", "listen", data_dir=tmp_path / "data", port=busy_port)
    assert with_option.returncode != 0 and "Traceback" in with_option.stderr and "PortInUse" in with_option.stderr
    with_env = preread("listen", data_dir=tmp_path / "data", port=busy_port, debug=1)
    assert with_env.returncode != 0 and "Traceback" in with_env.stderr


def test_malformed_database_url(tmp_path: Path) -> None:
    result = preread("db", "upgrade", data_dir=tmp_path / "data", database_url="notaurl")
    assert_operator_error(result, "PREREAD_DATABASE_URL", "'notaurl'", "not a database URL")


def test_unreachable_database_masks_the_password(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    url = f"postgresql+psycopg://preread:s3cret-pw@127.0.0.1:{port}/preread"
    result = preread("db", "upgrade", data_dir=tmp_path / "data", database_url=url)
    message = assert_operator_error(result, "PREREAD_DATABASE_URL", "cannot reach", f"preread:***@127.0.0.1:{port}")
    assert "s3cret-pw" not in message and "s3cret-pw" not in result.stdout


def test_missing_postgres_database(tmp_path: Path) -> None:
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/preread_no_such_database"
    result = preread("db", "upgrade", data_dir=tmp_path / "data", database_url=url)
    assert_operator_error(result, "no database 'preread_no_such_database'", "PREREAD_DATABASE_URL", "createdb")


def test_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    result = preread("db", "upgrade", data_dir=blocker / "data")
    assert_operator_error(result, "PREREAD_DATA_DIR", str(blocker / "data"))


def test_bad_setting_value_names_the_variable(tmp_path: Path) -> None:
    result = preread("status", data_dir=tmp_path / "data", port="eleven")
    assert_operator_error(result, "PREREAD_PORT", "integer")


def test_images_url_without_a_worker_token_names_both_and_prints_no_secret(tmp_path: Path) -> None:
    result = preread("status", data_dir=tmp_path / "data", images_url="https://listener:8080")
    assert_operator_error(result, "PREREAD_WORKER_TOKEN", "PREREAD_IMAGES_URL", "--role worker")
    result = preread("status", data_dir=tmp_path / "data", images_url="ftp://listener", worker_token="prt_do_not_print")
    assert_operator_error(result, "PREREAD_IMAGES_URL", "https://listener-host:8080")
    assert "prt_do_not_print" not in result.stderr


def test_unknown_device(tmp_path: Path) -> None:
    result = preread("draft", str(testdata("CT_small.dcm")), "--model", str(tmp_path), data_dir=tmp_path / "data", device="gpu")
    # torch refuses it today; once settings validate the device, the same one line comes from there
    assert_operator_error(result, "PREREAD_DEVICE", "'gpu'", "cpu")


def test_missing_model_names_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = preread("draft", str(testdata("CT_small.dcm")), "--model", str(missing), data_dir=tmp_path / "data", device="cpu")
    message = assert_operator_error(result, str(missing), "PREREAD_MODEL=/path/to/folder", "no such folder")
    assert "force=True" not in message


def test_every_command_of_the_group_gets_it() -> None:
    """A command added later (by anyone) is covered without doing anything."""
    app = typer.Typer(cls=OperatorErrorGroup)

    @app.command("later")
    def later() -> None:
        raise OperatorError("the thing (PREREAD_THING) is wrong: set PREREAD_THING=right")

    @app.command("bug")
    def bug() -> None:
        raise ZeroDivisionError("a real bug")

    result = CliRunner().invoke(app, ["later"])
    assert result.exit_code == EXIT_OPERATOR
    assert result.output.strip() == "preread later: the thing (PREREAD_THING) is wrong: set PREREAD_THING=right"
    bug_result = CliRunner().invoke(app, ["bug"])
    assert isinstance(bug_result.exception, ZeroDivisionError), "unexpected failures keep their traceback"


def test_mask_url_and_explain_unknown() -> None:
    assert mask_url("postgresql+psycopg://me:pa:ss@db:5432/x") == "postgresql+psycopg://me:***@db:5432/x"
    assert mask_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert explain(KeyError("nothing an operator can fix")) is None
