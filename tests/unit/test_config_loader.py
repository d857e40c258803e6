"""The configuration loader: valid files load, every mistake is reported where it is."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from agent.wiring.load import config_hash, load_config, load_config_text
from agent.wiring.schema import Config
from config.errors import ConfigError, ConfigIssue
from config.secrets import Secret

DATA = Path(__file__).parent / "data" / "config"
EXAMPLE = Path(__file__).parents[2] / "config" / "example.yaml"

# A valid base; tests append or alter sections. Line numbers below refer to this layout.
BASE = """\
agent: {id: edge-01, site: plant-a}
sources:
  press-plc:
    type: modbus
    host: 127.0.0.1
    tags:
      press.speed: {address: 14, type: float32}
      press.state: {address: 10}
machines:
  press-3:
    line: line-2
    state: {tag: press.speed, running_above: 10}
sinks:
  erp: {type: http, url: "https://erp.example/api"}
"""


def load(text: str, name: str = "cfg.yaml") -> Config:
    return load_config_text(textwrap.dedent(text), name)


def errors(text: str, name: str = "cfg.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, name)
    assert info.value.issues, "a ConfigError must carry at least one issue"
    assert str(info.value) == "\n".join(str(i) for i in info.value.issues)
    return [str(i) for i in info.value.issues]


# ------------------------------------------------------------------ valid files


def test_example_yaml_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", "example-token")
    config = load_config(EXAMPLE)
    assert set(config.sources) == {"press-plc", "filler-plc", "packer-plc", "line2-broker"}
    assert set(config.machines) == {"filler-1", "press-3", "cutter-6", "packer-2", "oven-2",
                                    "sealer-5"}
    token = config.sinks["erp"].auth.bearer_token
    assert isinstance(token, Secret)
    assert token.reference == "${env:ERP_TOKEN}"
    assert token.reveal() == "example-token"
    # Every tag a machine reads is defined by a source.
    tags = config.tag_index()
    for machine in config.machines.values():
        for _, tag in machine.tag_refs():
            assert tag in tags


def test_example_yaml_without_its_token_names_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ERP_TOKEN", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE)
    [issue] = info.value.issues
    assert issue.path == "sinks.erp.auth.bearer_token"
    assert issue.message == "environment variable ERP_TOKEN is not set"
    assert issue.file == str(EXAMPLE)
    assert issue.line is not None
    assert "bearer_token:" in EXAMPLE.read_text().splitlines()[issue.line - 1]


def test_minimal_config_gets_defaults() -> None:
    config = load_config(DATA / "minimal.yaml")
    assert config.agent.id == "edge-01"
    assert config.sources == {} and config.machines == {} and config.sinks == {}
    assert config.health.listen == "127.0.0.1:9780"


def test_yaml_1_2_scalars_stay_what_they_look_like() -> None:
    config = load("""\
        agent: {id: on, site: NO}
        machines:
          m1:
            line: line-1
            state: {tag: t, map: {0755: running, yes: idle}}
        sources:
          dev: {type: modbus, host: h, tags: {t: {address: 0}}}
        sinks:
          erp: {type: http, url: "https://x.example"}
        """)
    assert (config.agent.id, config.agent.site) == ("on", "NO")  # not True / False
    assert set(config.machines["m1"].state.map or {}) == {"755", "yes"}  # 0755 is not octal


# ------------------------------------------------------------------ schema errors, located


def test_typo_key_is_unknown_with_a_suggestion() -> None:
    assert errors("""\
        agent:
          id: edge-01
          site: plant-a
          dat_dir: /tmp/x
        """) == ["cfg.yaml:4:3: agent.dat_dir: unknown key 'dat_dir'; did you mean 'data_dir'?"]


def test_unknown_key_without_a_close_match_lists_the_allowed_keys() -> None:
    assert errors("agent: {id: a, site: b}\nhealth: {port: 80}\n") == [
        "cfg.yaml:2:10: health.port: unknown key 'port'; allowed keys: listen, "
        "max_pending_age, min_disk_free, buffer_full_ratio, reason_entry"]


def test_wrong_enum_value_lists_the_allowed_values() -> None:
    text = BASE.replace("type: float32", "type: flaot32")
    assert errors(text) == [
        "cfg.yaml:7:34: sources.press-plc.tags.\"press.speed\".type: 'flaot32' is not one of "
        "'bool', 'int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64', 'float32', "
        "'float64', 'string'; did you mean 'float32'?"]


def test_wrong_type() -> None:
    text = BASE.replace("host: 127.0.0.1", "host: 127.0.0.1\n    port: http")
    assert errors(text) == [
        "cfg.yaml:6:5: sources.press-plc.port: expected a whole number, got 'http'"]
    assert errors("agent: {id: 42, site: s}\n") == [
        "cfg.yaml:1:9: agent.id: expected text, got 42 (put it in quotes)"]


def test_missing_key_points_at_the_mapping_that_lacks_it() -> None:
    text = BASE.replace("    line: line-2\n", "")
    assert errors(text) == [
        "cfg.yaml:10:3: machines.press-3.line: required key 'line' is missing"]
    # 'host' is required by the transport (tcp, rtu-over-tcp), not by the schema alone.
    text = BASE.replace("    host: 127.0.0.1\n", "")
    assert errors(text) == ["cfg.yaml:3:3: sources.press-plc: transport tcp needs 'host'"]


def test_missing_top_level_section_points_at_the_document_start() -> None:
    assert errors("# just a comment\nhealth: {listen: '127.0.0.1:1'}\n") == [
        "cfg.yaml:2:1: agent: required key 'agent' is missing"]


def test_bad_duration() -> None:
    text = BASE.replace("host: 127.0.0.1", "host: 127.0.0.1\n    poll_interval: 5 sec")
    assert errors(text) == [
        "cfg.yaml:6:5: sources.press-plc.poll_interval: '5 sec' is not a duration; write it "
        "like '500ms', '5s', '2m' or '1h'"]


def test_bare_number_duration_is_refused() -> None:
    text = BASE.replace("host: 127.0.0.1", "host: 127.0.0.1\n    timeout: 5")
    assert errors(text) == [
        "cfg.yaml:6:5: sources.press-plc.timeout: expected a duration like '500ms', '5s' or "
        "'2m', got 5"]


def test_bad_size() -> None:
    assert errors(BASE + "buffer: {max_size: 2 gigs}\n") == [
        "cfg.yaml:15:10: buffer.max_size: '2 gigs' is not a size; write it like '512MiB', "
        "'2GiB' or '500MB'"]


def test_model_rule_error_has_no_pydantic_noise() -> None:
    text = BASE.replace("running_above: 10", "running_above: 10, map: {1: running}")
    assert errors(text) == [
        "cfg.yaml:12:5: machines.press-3.state: give exactly one of 'map', 'running_above' or "
        "'running_below'"]


def test_unknown_source_type() -> None:
    text = BASE.replace("type: modbus", "type: profibus")
    assert errors(text) == [
        "cfg.yaml:4:5: sources.press-plc.type: unknown type 'profibus'; expected "
        "'modbus', 'opcua', 'mqtt'"]


def test_missing_source_type() -> None:
    text = BASE.replace("    type: modbus\n", "")
    assert errors(text) == [
        "cfg.yaml:3:3: sources.press-plc.type: required key 'type' is missing (one of "
        "'modbus', 'opcua', 'mqtt')"]


def test_bad_component_id_is_reported_at_the_key() -> None:
    text = BASE.replace("  press-3:", "  press 3:")
    assert errors(text) == [
        "cfg.yaml:10:3: machines.\"press 3\": id 'press 3' may only contain letters, digits, "
        "'.', '_' and '-' and must start with a letter or digit"]


# ------------------------------------------------------------------ YAML-level errors


def test_malformed_yaml_is_located() -> None:
    assert errors("agent:\n  id: [edge-01\n  site: plant-a\n") == [
        "cfg.yaml:3:7: invalid YAML: while parsing a flow sequence, expected ',' or ']', "
        "but got ':' (started on line 2)"]


def test_tab_indentation_is_located() -> None:
    [message] = errors("agent:\n\tid: edge-01\n")
    assert message.startswith("cfg.yaml:2:1: invalid YAML: ")
    assert "'\\t'" in message


def test_duplicate_key_is_an_error() -> None:
    assert errors("agent: {id: a, site: b}\nsinks: {}\nagent: {id: c, site: d}\n") == [
        "cfg.yaml:3:1: duplicate key 'agent'; each key may appear only once in a mapping"]


def test_nested_duplicate_key_is_an_error() -> None:
    text = BASE.replace("    host: 127.0.0.1\n", "    host: 127.0.0.1\n    host: 10.0.0.1\n")
    assert errors(text) == [
        "cfg.yaml:6:5: duplicate key 'host'; each key may appear only once in a mapping"]


@pytest.mark.parametrize("text", ["", "\n", "# nothing but a comment\n"])
def test_empty_file(text: str) -> None:
    assert errors(text) == [
        "cfg.yaml:1:1: the configuration is empty; it needs at least an 'agent' section"]


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "a list"),
                                            ("just text\n", "a single value")])
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    assert errors(text) == [
        "cfg.yaml:1:1: the top level must be a mapping of sections (agent, sources, machines, "
        f"sinks, buffer), not {kind}"]


def test_two_documents_are_refused() -> None:
    [message] = errors("agent: {id: a, site: b}\n---\nagent: {id: c, site: d}\n")
    assert message.startswith("cfg.yaml:2:1: invalid YAML: expected a single document")


def test_custom_yaml_tags_are_refused() -> None:
    assert errors("agent: {id: !secret x, site: b}\n") == [
        "cfg.yaml:1:9: agent.id: YAML tag '!secret' is not supported here; write plain text, "
        "numbers, true/false, lists or mappings"]


# ------------------------------------------------------------------ cross-references


def test_unknown_tag_reference_names_machine_path_and_tag() -> None:
    text = BASE.replace("state: {tag: press.speed", "state: {tag: press.sped")
    assert errors(text) == [
        "cfg.yaml:12:13: machines.press-3.state.tag: machine 'press-3' uses tag "
        "'press.sped', which no source defines; did you mean 'press.speed'?"]


def test_unknown_tag_without_close_match() -> None:
    text = BASE.replace("running_above: 10}", "running_above: 10}\n    order_tag: ord")
    assert errors(text) == [
        "cfg.yaml:13:5: machines.press-3.order_tag: machine 'press-3' uses tag 'ord', which "
        "no source defines"]


def test_tag_defined_in_two_sources_names_both() -> None:
    text = BASE.replace("machines:", """\
  other-plc:
    type: modbus
    host: 127.0.0.2
    tags:
      press.state: {address: 1}
machines:""")
    assert errors(text) == [
        "cfg.yaml:13:7: sources.other-plc.tags.\"press.state\": tag 'press.state' is defined "
        "by both source 'press-plc' and source 'other-plc'; a tag id must be unique across "
        "sources"]


def test_machines_without_sinks_is_an_error() -> None:
    text = BASE.replace('sinks:\n  erp: {type: http, url: "https://erp.example/api"}\n',
                        "sinks: {}\n")
    assert errors(text) == [
        "cfg.yaml:13:1: sinks: no sinks configured: the machines' events would only "
        "accumulate in the buffer; add one under 'sinks'"]
    no_section = BASE.replace('sinks:\n  erp: {type: http, url: "https://erp.example/api"}\n',
                              "")
    assert errors(no_section)[0].startswith("cfg.yaml:9:1: sinks: no sinks configured")


def test_no_machines_needs_no_sinks() -> None:
    config = load("agent: {id: a, site: b}\nsources:\n  d: {type: modbus, host: h, "
                  "tags: {t: {address: 0}}}\n")
    assert config.sinks == {}


# ------------------------------------------------------------------ all problems at once


def test_every_error_in_a_file_is_reported_in_order() -> None:
    path = DATA / "many_errors.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    f = str(path)
    assert [str(i) for i in info.value.issues] == [
        f"{f}:5:3: agent.dat_dir: unknown key 'dat_dir'; did you mean 'data_dir'?",
        f"{f}:10:5: sources.press-plc.poll_interval: '5 sec' is not a duration; write it "
        "like '500ms', '5s', '2m' or '1h'",
        f"{f}:12:34: sources.press-plc.tags.\"press.speed\".type: 'flaot32' is not one of "
        "'bool', 'int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64', 'float32', "
        "'float64', 'string'; did you mean 'float32'?",
        f"{f}:13:7: sources.press-plc.tags.\"press.state\".address: required key 'address' "
        "is missing",
        f"{f}:17:13: machines.press-3.state.tag: machine 'press-3' uses tag 'press.sped', "
        "which no source defines; did you mean 'press.speed'?",
        f"{f}:22:5: sinks.erp.mode: 'batched' is not one of 'single', 'batch'; did you mean "
        "'batch'?",
        f"{f}:24:3: buffer.max_size: 'lots' is not a size; write it like '512MiB', '2GiB' or "
        "'500MB'",
    ]
    assert all(isinstance(i, ConfigIssue) for i in info.value.issues)


# ------------------------------------------------------------------ files and paths


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    shutil.copy(DATA / "relative_paths.yaml", config_dir / "config.yaml")
    config = load_config(config_dir / "config.yaml")
    assert config.agent.data_dir == config_dir / "state"
    assert config.buffer_path == config_dir / "db" / "buffer.db"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = load_config_text("agent: {id: a, site: b, data_dir: /srv/edge}\n",
                              str(tmp_path / "c.yaml"))
    assert config.agent.data_dir == Path("/srv/edge")
    assert config.buffer_path == Path("/srv/edge/buffer.db")


def test_text_without_a_file_resolves_against_base_dir(tmp_path: Path) -> None:
    config = load_config_text("agent: {id: a, site: b, data_dir: var}\n", base_dir=tmp_path)
    assert config.agent.data_dir == tmp_path / "var"


def test_home_directory_paths_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config_text("agent: {id: a, site: b, data_dir: ~/edge}\n", "/etc/c.yaml")
    assert config.agent.data_dir == tmp_path / "edge"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: cannot read the configuration file: No such file " \
                              "or directory"


def test_non_utf8_file_is_located(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"agent:\n  id: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2:10: the file is not UTF-8 text"


# ------------------------------------------------------------------ config_hash


def test_config_hash_is_stable_and_sensitive() -> None:
    a = load(BASE)
    assert config_hash(a) == config_hash(load(BASE))
    assert len(config_hash(a)) == 64
    changed = load(BASE.replace("running_above: 10", "running_above: 11"))
    assert config_hash(changed) != config_hash(a)
    # The order of keys in the file does not matter.
    reordered = load("sinks:\n  erp: {url: \"https://erp.example/api\", type: http}\n"
                     + BASE.split("sinks:")[0])
    assert config_hash(reordered) == config_hash(a)
