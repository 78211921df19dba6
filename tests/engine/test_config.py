"""Settings: every bad value refused with a message naming the setting and what is allowed."""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from engine import config
from engine.cli import main
from engine.config import (
    PublishableKey,
    ServerKey,
    Settings,
    ensure_server_key,
    load_settings,
    prepare_data_dir,
)
from engine.errors import ConfigError


@pytest.fixture(autouse=True)
def no_tagrelay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands run here see only the settings a test gives them."""
    for name in list(os.environ):
        if name.startswith("TAGRELAY_"):
            monkeypatch.delenv(name)


def refused(env: dict[str, str], flags: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(env, flags)
    return str(caught.value)


def config_file(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "tagrelay.yaml"
    path.write_text(textwrap.dedent(text))
    return {"TAGRELAY_CONFIG": str(path)}


# -- environment variables --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TAGRELAY_LOG_LEVEL", "bogus", "must be one of debug, info, warning, error, critical"),
        ("TAGRELAY_THREADS", "0", "must be a whole number, at least 1, not '0'"),
        ("TAGRELAY_THREADS", "abc", "must be a whole number, at least 1, not 'abc'"),
        ("TAGRELAY_READ_TIMEOUT", "0", "must be a whole number from 1 to 3600, not '0'"),
        ("TAGRELAY_WORKERS", "", "must be a whole number, at least 1, not ''"),
        ("TAGRELAY_BIND", "127.0.0.1:99999", "a port from 1 to 65535"),
        ("TAGRELAY_BIND", "", "must be HOST:PORT"),
        ("TAGRELAY_BIND", "127.0.0.1:", "must be HOST:PORT"),
        ("TAGRELAY_BIND", "::1", "an IPv6 address goes in brackets"),
        ("TAGRELAY_DELIVER", "ture", "must be true or false (or 1/0, yes/no, on/off), not 'ture'"),
        ("TAGRELAY_COOKIE_SECURE", "ture", "must be true or false"),
        ("TAGRELAY_RATE_LIMIT", "-1", "must be a whole number, at least 0"),
        ("TAGRELAY_RETENTION_DAYS", "-1", "must be a whole number from 0 to 36500"),
        ("TAGRELAY_RETENTION_DAYS", "9" * 40, "must be a whole number from 0 to 36500"),
        ("TAGRELAY_TRUSTED_PROXIES", "-2", "must be a whole number, at least 0"),
        ("TAGRELAY_MIN_FREE_MB", "64MB", "must be a whole number, at least 0"),
        ("TAGRELAY_CLICK_ID_WINDOW_DAYS", "nan", "must be a number of days from 0 to 36500"),
        ("TAGRELAY_CLICK_ID_WINDOW_DAYS", "-1", "must be a number of days from 0 to 36500"),
        ("TAGRELAY_CLICK_ID_WINDOW_DAYS", "1e400", "must be a number of days from 0 to 36500"),
        ("TAGRELAY_COOKIE_MAX_AGE", "0", "must be a whole number from 1 to 34560000"),
        ("TAGRELAY_COOKIE_NAME", "my cookie", "must be a cookie name"),
        ("TAGRELAY_SQLITE_SYNC", "off", "must be one of normal, full"),
        ("TAGRELAY_IP_STORAGE", "all", "must be one of consent, truncate, drop, keep"),
        ("TAGRELAY_DATA_DIR", "", "must be a path"),
        ("TAGRELAY_SERVER_KEYS", "k1,:secret", "has an entry with no key"),
        ("TAGRELAY_PUBLISHABLE_KEYS", "pk_1", "has a key with no origins"),
    ],
)
def test_a_bad_environment_value_is_refused_naming_the_variable(
    name: str, value: str, message: str
) -> None:
    error = refused({name: value})

    assert error.startswith(f"{name} ")
    assert message in error


def test_a_secret_is_never_quoted_in_an_error() -> None:
    error = refused({"TAGRELAY_SERVER_KEYS": "sk_live_abc, :whsec_topsecret"})

    assert "whsec_topsecret" not in error
    assert "sk_live_abc" not in error


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("On", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("off", False),
        ("0", False),
    ],
)
def test_booleans_take_the_usual_words(value: str, expected: bool) -> None:
    settings = load_settings({"TAGRELAY_DELIVER": value, "TAGRELAY_COOKIE_SECURE": value})

    assert (settings.deliver, settings.cookie_secure) == (expected, expected)


@pytest.mark.parametrize(
    ("value", "bind"),
    [
        ("0.0.0.0:9000", "0.0.0.0:9000"),
        ("0.0.0.0", "0.0.0.0:8080"),  # a host alone listens on tagrelay's port, not gunicorn's
        ("localhost", "localhost:8080"),
        ("[::1]:9000", "[::1]:9000"),
        ("[::]", "[::]:8080"),
        ("unix:/run/tagrelay.sock", "unix:/run/tagrelay.sock"),
    ],
)
def test_bind_takes_host_and_port_and_defaults_the_port_to_8080(value: str, bind: str) -> None:
    assert load_settings({"TAGRELAY_BIND": value}).bind == bind


def test_threads_are_a_setting_of_their_own() -> None:
    assert load_settings({}).threads == 4
    assert load_settings({"TAGRELAY_THREADS": "8"}).threads == 8
    assert load_settings({"TAGRELAY_READ_TIMEOUT": "30"}).read_timeout == 30


def test_good_values_are_read_as_before() -> None:
    settings = load_settings(
        {
            "TAGRELAY_WORKERS": "3",
            "TAGRELAY_LOG_LEVEL": "debug",
            "TAGRELAY_CLICK_ID_WINDOW_DAYS": "7.5",
            "TAGRELAY_RETENTION_DAYS": "0",
            "TAGRELAY_SERVER_KEYS": "k1, k2:secret",
            "TAGRELAY_PUBLISHABLE_KEYS": "pk_1=https://a.example/|https://b.example,pk_2=*",
            "TAGRELAY_DB": "/srv/store.db",
            "TAGRELAY_COOKIE_DOMAIN": "",
            "TAGRELAY_MIN_FREE_MB": "512",
        }
    )

    assert (settings.workers, settings.log_level, settings.retention_days) == (3, "DEBUG", 0)
    assert settings.click_id_window == 7.5 * 86400
    assert settings.server_keys == (ServerKey("k1"), ServerKey("k2", "secret"))
    assert settings.publishable_keys == (
        PublishableKey("pk_1", ("https://a.example", "https://b.example")),
        PublishableKey("pk_2", ("*",)),
    )
    assert settings.database_path == Path("/srv/store.db")
    assert settings.cookie_domain is None
    assert settings.min_free_mb == 512


def test_publishable_origins_are_read_as_browsers_send_them() -> None:
    # A page at https://shop.example sends exactly that as its Origin.
    settings = load_settings(
        {
            "TAGRELAY_PUBLISHABLE_KEYS": (
                "pk_1=https://Shop.Example:443/|HTTP://localhost:80|http://localhost:3000"
                "|http://[::1]:8080|capacitor://localhost|https://Bücher.example"
            )
        }
    )

    assert settings.publishable_keys[0].origins == (
        "https://shop.example",
        "http://localhost",
        "http://localhost:3000",
        "http://[::1]:8080",
        "capacitor://localhost",
        "https://xn--bcher-kva.example",  # an internationalized host, as browsers send it
    )
    assert settings.publishable_keys[0].allows("https://shop.example")


@pytest.mark.parametrize(
    ("origin", "message"),
    [
        ("https://*.shop.example", "has an origin with a wildcard, 'https://*.shop.example'"),
        ("shop.example", "has an origin that is not one, 'shop.example'"),
        ("https://shop.example/checkout", "has an origin that is not one, 'https://shop.exa"),
        ("https://shop.example:99999", "has an origin that is not one, 'https://shop.examp"),
    ],
)
def test_a_publishable_origin_no_page_could_send_is_refused(origin: str, message: str) -> None:
    error = refused({"TAGRELAY_PUBLISHABLE_KEYS": f"pk_1={origin}"})

    assert error.startswith(f"TAGRELAY_PUBLISHABLE_KEYS {message}")
    assert "scheme://host[:port]" in error


def test_a_publishable_origin_in_the_config_file_is_refused_naming_its_entry(
    tmp_path: Path,
) -> None:
    text = "publishable_keys: [{key: pk_1, origins: ['https://*.shop.example']}]"

    error = refused(config_file(tmp_path, text))

    assert "publishable_keys entry 1 has an origin with a wildcard" in error


# -- the config file ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server_keys: [{}]", "server_keys entry 1 needs a key (text)"),
        ("server_keys: [{key: k1}, {signing_secret: s}]", "server_keys entry 2 needs a key"),
        ("publishable_keys: [{origins: [a]}]", "publishable_keys entry 1 needs a key (text)"),
        ("publishable_keys: [{key: pk_1}]", "publishable_keys entry 1 needs origins"),
        ("server_keys: {key: abc}", "server_keys must be a list of entries"),
        (
            "server_keys: [{key: abc, signing_secret: 1234567890}]",
            "server_keys entry 1: signing_secret must be text; quote it",
        ),
        ("server_keys: [{key: 0123}]", "server_keys entry 1: key must be text; quote it"),
        ("server_keys: [{key: k, secret: s}]", "unknown field 'secret' (known: key, signing_"),
        ("workers: 0", "workers must be a whole number, at least 1, not 0"),
        ("workers: true", "workers must be a whole number, at least 1, not true"),
        ("workers: 2.5", "workers must be a whole number, at least 1, not 2.5"),
        ("deliver: ture", "deliver must be true or false"),
        ("bind:", "bind must be HOST:PORT"),
        ("click_id_window_days: .nan", "click_id_window_days must be a number of days"),
        ("db: [a, b]", "db must be a path"),
    ],
)
def test_a_bad_value_in_the_config_file_is_refused_naming_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    env = config_file(tmp_path, text)

    error = refused(env)

    assert error.startswith(f"{env['TAGRELAY_CONFIG']}: ")
    assert message in error


@pytest.mark.parametrize(
    "text",
    [
        # the environment's `key:secret` written as YAML: the key is the entry's field name
        "server_keys:\n  - sk_live_SUPERSECRET_0123: whsec_SIGNINGSECRET_abcdef\n",
        "server_keys: [{sk_live_SUPERSECRET_0123: whsec_SIGNINGSECRET_abcdef}]\n",
        "server_keys: [{key: k1, sk_live_SUPERSECRET_0123: x}]\n",
    ],
)
def test_a_server_key_written_as_a_field_name_is_not_quoted(tmp_path: Path, text: str) -> None:
    error = refused(config_file(tmp_path, text))

    assert "server_keys entry 1 has a field that is not key or signing_secret" in error
    assert "SUPERSECRET" not in error
    assert "SIGNINGSECRET" not in error


def test_a_signing_secret_is_not_quoted_when_it_is_refused(tmp_path: Path) -> None:
    error = refused(config_file(tmp_path, "server_keys: [{key: abc, signing_secret: 987654321}]"))

    assert "987654321" not in error


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('server_keys: "sk_live_SUPERSECRET_0123456789:whsec_SIGNINGSECRET_abcdef\n', "line 1"),
        ("log_level: info\nserver_keys: sk_live_SUPERSECRET_0123456789:whsec_SIGNINGSECRET: x\n",
         "line 2"),
        ("server_keys: sk_live_SUPERSECRET_0123456789\x07\n", "character U+0007"),
        # unquoted secrets YAML reads as a tag, an alias or an anchor, which it names
        ("server_keys: sk_1:!SUPERSECRET_0123\nx: !SIGNINGSECRET_abc\n", "line 2"),
        ("identity_secret: *SUPERSECRET_0123456789\n", "line 1"),
        ("a: &SUPERSECRET_01 1\nb: &SUPERSECRET_01 2\n", "line 2"),
    ],
    ids=["unclosed quote", "mapping in a value", "control character", "tag", "alias", "anchor"],
)  # fmt: skip
def test_a_config_file_that_is_no_valid_yaml_is_refused_without_quoting_it(
    tmp_path: Path, text: str, where: str
) -> None:
    # PyYAML's own message quotes the line, which holds the keys; this one reaches the logs.
    path = tmp_path / "tagrelay.yaml"
    path.write_text(text)

    error = refused({"TAGRELAY_CONFIG": str(path)})

    assert error.startswith(f"cannot read TAGRELAY_CONFIG {path}: ")
    assert where in error
    assert "SUPERSECRET" not in error and "SIGNINGSECRET" not in error


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("server_keys:\n  - key: sk_1\n\tsigning_secret: SUPERSECRET_0123\n",
         "line 3, column 1: a tab: YAML indents with spaces only"),
        ("log_level: info\nserver_keys: sk_SUPERSECRET_01: x\n",
         "line 2, column 31: a ': ' where YAML cannot take one"),
        ('identity_secret: "SUPERSECRET_0123456789\n',
         "line 1, column 18: a quoted text is not closed: its closing quote is missing"),
    ],
    ids=["tab", "colon in a value", "unclosed quote"],
)  # fmt: skip
def test_a_config_files_common_yaml_mistakes_are_said_in_plain_words(
    tmp_path: Path, text: str, words: str
) -> None:
    # As `tagrelay check` says them of rule files, where PyYAML's phrases ("while scanning a
    # quoted scalar") were given.
    path = tmp_path / "tagrelay.yaml"
    path.write_text(text)

    error = refused({"TAGRELAY_CONFIG": str(path)})

    assert error.startswith(f"cannot read TAGRELAY_CONFIG {path}: YAML syntax error at ")
    assert words in error
    assert "SUPERSECRET" not in error


def test_an_unknown_key_in_the_config_file_is_refused_with_the_known_keys(
    tmp_path: Path,
) -> None:
    error = refused(config_file(tmp_path, "bind: 0.0.0.0:80\nwrokers: 4\n"))

    assert "unknown setting 'wrokers' (did you mean 'workers'? known: rules, data_dir" in error
    assert "threads" in error
    assert "db" in error


def test_the_config_file_takes_the_variables_names_in_lower_case(tmp_path: Path) -> None:
    env = config_file(
        tmp_path,
        """
        threads: 8
        db: /srv/elsewhere.db
        log_level: debug
        server_keys:
          - sk_plain
          - {key: sk_signed, signing_secret: "1234567890"}
        publishable_keys:
          - {key: pk_1, origins: [https://shop.example/]}
        deliver: off
        """,
    )

    settings = load_settings(env)

    assert settings.threads == 8
    assert settings.database_path == Path("/srv/elsewhere.db")
    assert settings.log_level == "DEBUG"
    assert settings.server_keys == (ServerKey("sk_plain"), ServerKey("sk_signed", "1234567890"))
    assert settings.publishable_keys == (PublishableKey("pk_1", ("https://shop.example",)),)
    assert settings.deliver is False


def test_the_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    env = config_file(tmp_path, "workers: 3\nthreads: 2\n") | {"TAGRELAY_WORKERS": "5"}

    assert load_settings(env).workers == 5
    assert load_settings(env, {"workers": "7"}).workers == 7
    assert load_settings(env).threads == 2


def test_a_flag_is_checked_like_any_other_value() -> None:
    error = refused({}, {"workers": "0"})

    assert error == "--workers must be a whole number, at least 1, not '0'"


def test_the_serve_command_refuses_bad_settings_with_exit_2_and_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("TAGRELAY_LOG_LEVEL", "bogus")

    code = main(["serve", "--data-dir", str(tmp_path / "data")])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.splitlines() == [
        "tagrelay: TAGRELAY_LOG_LEVEL must be one of debug, info, warning, error, critical, "
        "not 'bogus'"
    ]


def test_workers_0_on_the_command_line_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--workers", "0"])

    assert code == 2
    assert "--workers must be a whole number, at least 1" in capsys.readouterr().err


# -- the data directory -----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_is_created_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "new" / "data")

    assert prepare_data_dir(settings) == []

    assert mode(tmp_path / "new" / "data") == 0o700


def test_an_existing_data_directory_of_tagrelay_is_tightened_never_loosened(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tagrelay.db").touch()
    data.chmod(0o755)
    strict = tmp_path / "strict"
    strict.mkdir()
    strict.chmod(0o500)

    notes = prepare_data_dir(Settings(data_dir=data))
    prepare_data_dir(Settings(data_dir=strict))

    assert mode(data) == 0o700
    assert notes == [f"{data} made private (mode 0700, was 0755)"]
    assert mode(strict) == 0o500


def test_a_data_directory_with_control_sockets_is_still_tagrelay_s(tmp_path: Path) -> None:
    # serve's control sockets, one per master (a running instance's, or a killed one's left
    # behind), and the single one of versions before: none makes the directory someone else's.
    data = tmp_path / "data"
    data.mkdir()
    for name in ("tagrelay.db", "gunicorn-4242.ctl", "gunicorn.ctl"):
        (data / name).touch()
    data.chmod(0o755)

    notes = prepare_data_dir(Settings(data_dir=data))

    assert mode(data) == 0o700
    assert notes == [f"{data} made private (mode 0700, was 0755)"]


def test_a_shared_directory_is_left_as_it_is_with_a_warning(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "someone_elses.txt").touch()
    shared.chmod(0o755)

    notes = prepare_data_dir(Settings(data_dir=shared, sources={"data_dir": "--data-dir"}))

    assert mode(shared) == 0o755
    assert notes == [
        f"warning: {shared} (--data-dir) is open to other users (mode 0755) and holds personal "
        "data; give tagrelay a directory of its own"
    ]


def test_a_data_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "afile"
    file.touch()

    with pytest.raises(ConfigError) as not_a_directory:
        prepare_data_dir(Settings(data_dir=file, sources={"data_dir": "--data-dir"}))
    with pytest.raises(ConfigError) as under_a_file:
        prepare_data_dir(Settings(data_dir=file / "sub"))

    assert str(not_a_directory.value) == f"--data-dir {file} is not a directory"
    assert str(under_a_file.value) == (
        f"TAGRELAY_DATA_DIR: cannot create {file / 'sub'}: Not a directory"
    )


def test_serve_with_a_data_directory_that_is_a_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "afile"
    file.touch()

    code = main(["serve", "--data-dir", str(file)])

    assert code == 2
    assert capsys.readouterr().err == f"tagrelay: --data-dir {file} is not a directory\n"


def test_a_database_elsewhere_gets_a_private_directory_too(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database=tmp_path / "db" / "store.db")

    prepare_data_dir(settings)

    assert mode(tmp_path / "db") == 0o700


# -- the server key -----------------------------------------------------------------------------


def test_the_server_key_is_returned_only_when_it_is_generated(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    first, generated = ensure_server_key(settings)
    again, repeated = ensure_server_key(settings)

    assert generated is not None
    assert first.server_keys == again.server_keys == (ServerKey(generated),)
    assert repeated is None
    assert mode(tmp_path / "data") == 0o700
    assert mode(tmp_path / "data" / "server_key") == 0o600


def test_two_servers_generating_the_key_at_once_both_start_with_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second to start read the file the first had created and not yet written: "is
    # empty; delete it", and it did not start.
    settings = Settings(data_dir=tmp_path / "data")
    real = config.secrets.token_urlsafe
    other: list[tuple[Settings, str | None]] = []
    calls = 0

    def while_generating(n: int) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:  # the other process starts in the middle of this one's generation
            other.append(ensure_server_key(settings))
        return real(n)

    monkeypatch.setattr(config.secrets, "token_urlsafe", while_generating)
    first, generated = ensure_server_key(settings)

    [(second, second_generated)] = other
    assert first.server_keys == second.server_keys
    assert [generated, second_generated].count(None) == 1  # printed by one of them only
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["server_key"]


def test_no_key_is_generated_when_keys_are_configured(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", server_keys=(ServerKey("k1"),))

    assert ensure_server_key(settings) == (settings, None)
    assert not (tmp_path / "data").exists()


def test_warn_is_read_as_warning_as_pythons_logging_does() -> None:
    assert load_settings({"TAGRELAY_LOG_LEVEL": "warn"}).log_level == "WARNING"


def test_tagrelay_test_reads_the_ip_policy_and_no_other_server_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAGRELAY_WORKERS", "zero")  # wrong, but not the rules tests' business

    rules = str(Path(__file__).resolve().parents[2] / "rules")
    code = main(["test", rules])

    assert code == 0, capsys.readouterr().err
    monkeypatch.setenv("TAGRELAY_IP_STORAGE", "bogus")
    assert main(["test", rules]) == 2
    assert "TAGRELAY_IP_STORAGE must be one of" in capsys.readouterr().err


def test_check_and_test_do_not_fail_on_an_unknown_key_in_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A typo in the server's settings is the server's to refuse, not `make check`'s.
    rules = Path(__file__).resolve().parents[2] / "rules"
    (tmp_path / "tagrelay.yaml").write_text(f"wrokers: 4\nrules: {rules}\n")
    monkeypatch.setenv("TAGRELAY_CONFIG", str(tmp_path / "tagrelay.yaml"))
    monkeypatch.delenv("TAGRELAY_RULES", raising=False)

    assert main(["test", str(rules)]) == 0, capsys.readouterr().err
    assert main(["check"]) == 0, capsys.readouterr().err  # the rules path from the file
    with pytest.raises(ConfigError, match="unknown setting 'wrokers'"):
        load_settings()


def test_an_identity_secret_must_be_sixteen_characters_and_is_never_quoted() -> None:
    error = refused({"TAGRELAY_IDENTITY_SECRET": "short-secret"})

    assert error == "TAGRELAY_IDENTITY_SECRET must be a secret of at least 16 characters"
    settings = load_settings({"TAGRELAY_IDENTITY_SECRET": "idsec_0123456789abcdef"})
    assert settings.identity_secret == "idsec_0123456789abcdef"
    assert "idsec_" not in repr(settings)


def test_query_parameters_to_redact_are_names_from_a_list_or_commas(tmp_path: Path) -> None:
    from_env = load_settings({"TAGRELAY_REDACT_QUERY_PARAMS": " ref, Mob ,,"})
    from_file = load_settings(config_file(tmp_path, "redact_query_params: [ref, Mob]\n"))

    assert from_env.redact_query_params == from_file.redact_query_params == {"ref", "mob"}
    assert load_settings({}).redact_query_params == frozenset()
    assert refused({"TAGRELAY_REDACT_QUERY_PARAMS": "ref,a=b"}) == (
        "TAGRELAY_REDACT_QUERY_PARAMS must be query parameter names, without '=', '&', '#', '?' "
        "or spaces ('a=b'), not 'ref,a=b'"
    )
    assert "must be query parameter names" in refused(
        config_file(tmp_path, "redact_query_params: {ref: 1}\n")
    )
