"""Secrets stay references and never leak; ${env:...}/${file:...} are substituted elsewhere."""

from __future__ import annotations

import textwrap
import traceback
from pathlib import Path

import pytest

from agent.wiring.load import config_hash, load_config, load_config_text
from agent.wiring.schema import Config
from config.errors import ConfigError
from config.secrets import Secret

SECRET = "s3cr3t-Tok3n-value-4711"


def config_text(sink: str, extra: str = "") -> str:
    """A valid config whose one sink is ``sink`` (YAML lines, 4-space indented)."""
    return textwrap.dedent("""\
        agent: {id: edge-01, site: plant-a}
        sources:
          dev: {type: modbus, host: h, tags: {t: {address: 0}}}
        machines:
          m1: {line: l1, state: {tag: t, running_above: 1}}
        sinks:
          erp:
        """) + textwrap.indent(textwrap.dedent(sink), "    ") + extra


def load(text: str, name: str = "cfg.yaml", base_dir: Path | None = None) -> Config:
    return load_config_text(text, name, base_dir=base_dir)


def issues(text: str, base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, base_dir=base_dir)
    return [str(i) for i in info.value.issues]


def everything_shown(err: ConfigError) -> str:
    return "".join(traceback.format_exception(err)) + repr(err) + repr(err.issues)


# ------------------------------------------------------------------ secret fields


def test_unset_env_secret_is_located_and_names_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ERP_TOKEN", raising=False)
    text = config_text("""\
        type: http
        url: https://erp.example/api
        auth: {bearer_token: "${env:ERP_TOKEN}"}
        """)
    assert issues(text) == [
        "cfg.yaml:10:12: sinks.erp.auth.bearer_token: environment variable ERP_TOKEN is not set"]


def test_env_secret_keeps_its_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", SECRET)
    config = load(config_text("""\
        type: http
        url: https://erp.example/api
        auth: {bearer_token: "${env:ERP_TOKEN}"}
        """))
    token = config.sinks["erp"].auth.bearer_token
    assert isinstance(token, Secret)
    assert token.reveal() == SECRET
    monkeypatch.setenv("ERP_TOKEN", "rotated")  # resolved on use, not copied at load
    assert token.reveal() == "rotated"


def test_secret_value_never_appears_in_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", SECRET)
    config = load(config_text("""\
        type: http
        url: https://erp.example/api
        auth: {bearer_token: "${env:ERP_TOKEN}"}
        """))
    for shown in (repr(config), str(config), config.model_dump_json(),
                  str(config.model_dump()), str(config.model_dump(mode="json"))):
        assert SECRET not in shown
        assert "${env:ERP_TOKEN}" in shown
    before = config_hash(config)
    monkeypatch.setenv("ERP_TOKEN", "another")
    assert config_hash(load(config_text("""\
        type: http
        url: https://erp.example/api
        auth: {bearer_token: "${env:ERP_TOKEN}"}
        """))) == before  # the hash covers the reference, not the value


def test_secret_value_never_appears_in_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", SECRET)
    text = config_text("""\
        type: http
        url: https://erp.example/api
        timeout: 5
        auth: {bearer_token: "${env:ERP_TOKEN}", user: admin}
        headers: {X-Token: 5}
        """, "buffer: {max_size: nope}\n")
    with pytest.raises(ConfigError) as info:
        load(text)
    assert len(info.value.issues) == 4
    assert SECRET not in everything_shown(info.value)


def test_literal_secret_is_masked_even_in_errors() -> None:
    literal = "literal-token-hunter2"
    config = load(config_text(f"""\
        type: http
        url: https://erp.example/api
        auth: {{bearer_token: {literal}}}
        """))
    assert config.sinks["erp"].auth.bearer_token.reveal() == literal  # type: ignore[union-attr]
    assert literal not in repr(config) + config.model_dump_json()
    # A broken sink of an unknown type: its whole mapping is the rejected input.
    with pytest.raises(ConfigError) as info:
        load(config_text(f"""\
            type: htp
            url: https://erp.example/api
            auth: {{bearer_token: {literal}, extra: 1}}
            """))
    assert [str(i) for i in info.value.issues] == [
        "cfg.yaml:8:5: sinks.erp.type: unknown type 'htp'; expected 'http', 'mqtt', 'nats'; "
        "did you mean 'http'?"]
    assert literal not in everything_shown(info.value)


def test_file_secret_relative_to_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "erp-token").write_text(SECRET + "\n")
    path = tmp_path / "config.yaml"
    path.write_text(config_text("""\
        type: http
        url: https://erp.example/api
        auth: {bearer_token: "${file:creds/erp-token}"}
        """))
    token = load_config(path).sinks["erp"].auth.bearer_token
    assert token is not None
    assert token.reveal() == SECRET
    assert token.reference == f"${{file:{tmp_path / 'creds' / 'erp-token'}}}"


def test_unreadable_file_secret_names_the_file(tmp_path: Path) -> None:
    text = config_text("""\
        type: http
        url: https://erp.example/api
        auth: {bearer_token: "${file:/nonexistent/erp-token}"}
        """)
    assert issues(text) == [
        "cfg.yaml:10:12: sinks.erp.auth.bearer_token: cannot read secret file "
        "/nonexistent/erp-token: No such file or directory"]


def test_secret_with_an_embedded_reference_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", SECRET)
    text = config_text("""\
        type: http
        url: https://erp.example/api
        auth: {bearer_token: "Bearer ${env:ERP_TOKEN}"}
        """)
    assert issues(text) == [
        "cfg.yaml:10:12: sinks.erp.auth.bearer_token: a secret is either exactly one "
        "reference, ${env:NAME} or ${file:/path}, or literal text without '${'"]


# ------------------------------------------------------------------ substitution elsewhere


def test_env_substituted_in_plain_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_URL", "https://erp.example/api/v1")
    monkeypatch.setenv("ERP_HOST", "mw.plant-a.example")
    monkeypatch.setenv("PLC_PORT", "1502")
    text = config_text("""\
        type: http
        url: ${env:ERP_URL}
        headers: {X-Forwarded-Host: "${env:ERP_HOST}:443", X-Literal: "$${env:ERP_HOST}"}
        """).replace("host: h,", "host: h, port: '${env:PLC_PORT}',")
    config = load(text)
    sink = config.sinks["erp"]
    assert sink.url == "https://erp.example/api/v1"
    assert sink.headers == {"X-Forwarded-Host": "mw.plant-a.example:443",
                            "X-Literal": "${env:ERP_HOST}"}
    assert config.sources["dev"].port == 1502


def test_unset_env_in_plain_string_is_one_located_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ERP_URL", raising=False)
    text = config_text("""\
        type: http
        url: ${env:ERP_URL}
        """)
    # Reported once: not also as "not an http:// URL".
    assert issues(text) == ["cfg.yaml:9:5: sinks.erp.url: environment variable ERP_URL is not set"]


def test_file_substituted_in_plain_strings(tmp_path: Path) -> None:
    (tmp_path / "url.txt").write_text("  https://erp.example/from-file\n")
    config = load(config_text("""\
        type: http
        url: ${file:url.txt}
        """), base_dir=tmp_path)
    assert config.sinks["erp"].url == "https://erp.example/from-file"


@pytest.mark.parametrize(("value", "message"), [
    ("${ERP_URL}", "'${ERP_URL}' is not a reference; write ${env:NAME} or ${file:/path} "
                   "(or $${ for a literal '${')"),
    ("${env:ERP URL}", "'ERP URL' is not an environment variable name"),
    ("https://${env:ERP_HOST", "'${' without a closing '}'; write $${ for a literal '${'"),
])
def test_malformed_references(value: str, message: str) -> None:
    text = config_text(f"""\
        type: http
        url: "{value}"
        """)
    assert issues(text) == [f"cfg.yaml:9:5: sinks.erp.url: {message}"]


def test_a_secret_too_short_to_mask_is_named_in_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from config.redaction import register_config_secrets

    monkeypatch.setenv("ERP_TOKEN", "pw12")
    config = load(config_text("""\
        type: http
        url: https://erp.example/api
        auth: {bearer_token: "${env:ERP_TOKEN}"}
        """))
    with caplog.at_level(logging.WARNING, logger="config.redaction"):
        register_config_secrets(config)
    assert "sinks.erp.auth.bearer_token (${env:ERP_TOKEN}) is shorter than 6" in caplog.text
    assert "pw12" not in caplog.text
    caplog.clear()
    monkeypatch.setenv("ERP_TOKEN", SECRET)
    with caplog.at_level(logging.WARNING, logger="config.redaction"):
        register_config_secrets(config)
    assert "shorter" not in caplog.text
