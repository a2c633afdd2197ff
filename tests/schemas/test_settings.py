"""Settings: one TOML file under ``PREREAD_*`` variables, typed values checked when read."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from preread.schemas.settings import (
    CONFIG_FILE_ENV,
    Destination,
    Settings,
    SettingsFileError,
    Source,
    TlsFiles,
    describe_error,
)
from tests.support.procs import base_env, preread_argv


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``PREREAD_*`` variable of the outer environment leaks into these tests."""
    for key in list(os.environ):
        if key.startswith("PREREAD_"):
            monkeypatch.delenv(key)


def _config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "preread.toml"
    path.write_text(text)
    monkeypatch.setenv(CONFIG_FILE_ENV, str(path))
    return path


def _error(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return describe_error(exc.value)


def test_file_sets_settings_by_name_and_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config(
        tmp_path,
        monkeypatch,
        'stable_after = 12\nmax_images = 2\ndraft_mode = "text"\nexport_fhir = true\nallowed_aes = ["CT1", "PACS@10.0.0.5"]\n',
    )
    monkeypatch.setenv("PREREAD_MAX_IMAGES", "3")
    settings = Settings()
    assert settings.stable_after == 12.0
    assert settings.max_images == 3  # the variable wins over the file
    assert settings.draft_mode == "text"
    assert settings.export_fhir is True
    assert settings.allowed_aes == ["CT1", "PACS@10.0.0.5"]
    assert settings.reconcile_after == 300.0  # neither set: the default


def test_file_holds_destinations_and_sources_with_the_shared_tls_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(
        tmp_path,
        monkeypatch,
        """
[[destinations]]
name = "pacs"
kind = "dicom"
host = "10.0.0.1"
port = 104
tls = { cert = "/etc/preread/cert.pem", key = "/etc/preread/key.pem", ca = "/etc/preread/ca.pem" }

[[destinations]]
name = "ehr"
kind = "fhir"

[[sources]]
name = "archive"
kind = "dicomweb"
""",
    )
    settings = Settings()
    pacs, ehr = settings.destinations
    assert isinstance(pacs, Destination) and (pacs.name, pacs.kind) == ("pacs", "dicom")
    assert pacs.model_extra == {"host": "10.0.0.1", "port": 104}  # kind-specific keys kept for that kind
    assert pacs.tls == TlsFiles(
        cert=Path("/etc/preread/cert.pem"), key=Path("/etc/preread/key.pem"), ca=Path("/etc/preread/ca.pem")
    )
    assert (ehr.name, ehr.kind, ehr.tls) == ("ehr", "fhir", None)
    # what a kind's own model is validated from: the table's keys, the tls table in its shape
    assert ehr.model_dump() == {"name": "ehr", "kind": "fhir"}
    assert pacs.model_dump()["tls"] == {
        "cert": Path("/etc/preread/cert.pem"), "key": Path("/etc/preread/key.pem"), "ca": Path("/etc/preread/ca.pem")
    }
    assert settings.sources == [Source(name="archive", kind="dicomweb")]


def test_without_a_file_there_are_no_destinations_or_sources() -> None:
    settings = Settings()
    assert settings.destinations == [] and settings.sources == []
    assert settings.allowed_aes == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stabel_after = 3\n", "unknown setting 'stabel_after' (did you mean 'stable_after'?)"),
        ("PREREAD_PORT = 104\n", "unknown setting 'PREREAD_PORT' (write it without the prefix: 'port')"),
        ("colour = 'blue'\n", "unknown setting 'colour'"),
    ],
)
def test_unknown_key_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    path = _config(tmp_path, monkeypatch, text)
    with pytest.raises(SettingsFileError) as exc:
        Settings()
    assert str(exc.value) == f"PREREAD_CONFIG_FILE={path}: {expected}"


def test_unknown_key_inside_a_table_is_an_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config(tmp_path, monkeypatch, '[[destinations]]\nname = "x"\nkind = "dicom"\ntls = { cert = "/c", kee = "/k" }\n')
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc) == "PREREAD_DESTINATIONS[0].tls.kee: Extra inputs are not permitted"


def test_destination_needs_a_name_and_a_kind_and_names_are_unique(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _config(tmp_path, monkeypatch, '[[destinations]]\nkind = "dicom"\n')
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc) == "PREREAD_DESTINATIONS[0].name: Field required"
    _config(tmp_path, monkeypatch, '[[sources]]\nname = "a"\nkind = "dicom"\n[[sources]]\nname = "a"\nkind = "dicomweb"\n')
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc) == "PREREAD_SOURCES: names must be unique; repeated: a"


def test_missing_or_broken_file_is_an_error_naming_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv(CONFIG_FILE_ENV, str(missing))
    with pytest.raises(SettingsFileError, match=f"^PREREAD_CONFIG_FILE={missing}: no such file"):
        Settings()
    path = _config(tmp_path, monkeypatch, "stable_after = = 3\n")
    with pytest.raises(SettingsFileError, match=f"^PREREAD_CONFIG_FILE={path}: not valid TOML: .*line 1"):
        Settings()


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("CUDA:1", "cuda:1")])
def test_device_accepts_auto_cpu_cuda_and_cuda_n(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("PREREAD_DEVICE", value)
    assert Settings().device == expected


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cpu0", ""])
def test_bad_device_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PREREAD_DEVICE", value)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc) == f"PREREAD_DEVICE must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {value!r}"


def test_draft_mode_is_json_or_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREREAD_DRAFT_MODE", "xml")
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc) == "PREREAD_DRAFT_MODE: Input should be 'json' or 'text'"


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", "auto"), ("on", True), ("off", False), ("true", True), ("0", False)]
)
def test_think_is_auto_or_a_boolean(monkeypatch: pytest.MonkeyPatch, value: str, expected: object) -> None:
    monkeypatch.setenv("PREREAD_THINK", value)
    assert Settings().think == expected


def test_think_rejects_other_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREREAD_THINK", "sometimes")
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc) == "PREREAD_THINK must be 'auto', 'on' or 'off', not 'sometimes'"


def test_allowed_aes_is_a_parsed_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREREAD_ALLOWED_AES", " CT1 , PACS @ 10.0.0.5,WS@192.168.0.0/24,")
    assert Settings().allowed_aes == ["CT1", "PACS@10.0.0.5", "WS@192.168.0.0/24"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("CT1,THIS_TITLE_IS_TOO_LONG", "PREREAD_ALLOWED_AES: AE title must be 1 to 16 characters, not 'THIS_TITLE_IS_TOO_LONG'"),
        ("PACS@10.0.0.300", "PREREAD_ALLOWED_AES: '10.0.0.300' (for PACS) is not an address or network"),
        ("@10.0.0.1", "PREREAD_ALLOWED_AES: AE title must be 1 to 16 characters, not ''"),
    ],
)
def test_bad_allowed_aes_entry_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("PREREAD_ALLOWED_AES", value)
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc) == expected


def test_bool_and_number_settings_reject_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREREAD_SYNC_WRITES", "sometimes")
    monkeypatch.setenv("PREREAD_STABLE_AFTER", "-1")
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc).splitlines() == [
        "PREREAD_STABLE_AFTER: Input should be greater than or equal to 0",
        "PREREAD_SYNC_WRITES: Input should be a valid boolean, unable to interpret input",
    ]


def test_unknown_keyword_is_an_error() -> None:
    with pytest.raises(ValidationError) as exc:
        Settings(stabel_after=3)  # type: ignore[call-arg]  # the misspelling is the point of the test
    assert _error(exc) == "PREREAD_STABEL_AFTER: Extra inputs are not permitted"


def test_command_reads_the_settings_file(tmp_path: Path) -> None:
    """``preread db upgrade`` puts the embedded database in the file's data dir, from another directory."""
    data_dir = tmp_path / "data"
    config = tmp_path / "preread.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = base_env(config_file=config)
    done = subprocess.run(
        preread_argv("db", "upgrade"), env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (data_dir / "preread.db").is_file()
    assert list(elsewhere.iterdir()) == []


def test_process_settings_error_names_every_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from preread.schemas.settings import SettingsError, get_settings

    monkeypatch.setenv("PREREAD_DEVICE", "gpu")
    monkeypatch.setenv("PREREAD_PORT", "http")
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as exc:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert str(exc.value).splitlines() == [
        "PREREAD_DEVICE must be 'auto', 'cpu', 'cuda' or 'cuda:N', not 'gpu'",
        "PREREAD_PORT: Input should be a valid integer, unable to parse string as an integer",
    ]


def test_images_url_needs_a_worker_token_and_is_a_plain_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREREAD_IMAGES_URL", "https://listener.example:8080/")
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert _error(exc).startswith("PREREAD_WORKER_TOKEN: needed with PREREAD_IMAGES_URL"), _error(exc)
    assert "--role worker" in _error(exc)
    monkeypatch.setenv("PREREAD_WORKER_TOKEN", "prt_secret")
    settings = Settings()
    assert settings.images_url == "https://listener.example:8080", "one base URL, without the trailing slash"
    assert settings.worker_token is not None and "prt_secret" not in repr(settings)
    for bad, needle in (("ftp://listener", "must be the API's base URL"), ("listener:8080", "must be the API's base URL"),
                        ("https://user:pw@listener", "holds no credentials")):
        monkeypatch.setenv("PREREAD_IMAGES_URL", bad)
        with pytest.raises(ValidationError) as exc:
            Settings()
        assert _error(exc).startswith("PREREAD_IMAGES_URL") and needle in _error(exc), _error(exc)
    monkeypatch.delenv("PREREAD_IMAGES_URL")
    monkeypatch.delenv("PREREAD_WORKER_TOKEN")
    assert Settings().images_url is None, "unset: the infer step reads the data dir as on one host"
