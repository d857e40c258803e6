"""Load the agent's YAML configuration into a validated ``Config``, or explain every problem.

::

    text --ruamel (YAML 1.2, marks)--> plain data + marks
         --prepare--> ${env:..}/${file:..} substituted outside secrets, relative paths resolved
         --pydantic--> Config  (errors mapped back to FILE:LINE:COL: key.path: message)
         --cross-references--> tags used by machines exist, tag ids unique, a sink if machines

Guarantees:
- ``load_config``/``load_config_text`` return a ``Config`` or raise ``ConfigError`` listing
  *every* problem found (sorted by position), each located in the file where possible.
- A ``Secret`` field keeps its reference; its value is resolved (and checked) by ``Secret`` and
  never appears in an error message, ``repr(config)``, ``model_dump`` or ``config_hash``.
- Relative paths (``agent.data_dir``, ``buffer.path``, every ``Path`` option, and
  ``${file:...}`` references) are relative to the configuration file's directory.
- No I/O beyond reading the file itself and the ``${file:...}`` references.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from agent.detect.config import MachineConfig
from agent.sinks.addressing import placeholders
from agent.sinks.config import NatsSinkConfig
from agent.wiring.schema import AgentSettings, Config
from config._messages import dotted, suggest, translate
from config._refs import prepare
from config._yamlmarks import Mark, Marks, YamlIssue, parse_yaml
from config._yamlmarks import Path as KeyPath
from config.errors import ConfigError, ConfigIssue
from config.redaction import add_secret_values, redact

__all__ = ["MAX_CONFIG_BYTES", "config_hash", "load_buffer_path", "load_config",
           "load_config_text"]

# A plant's configuration is tens of kilobytes; far more is a wrong file or an attack.
MAX_CONFIG_BYTES = 2**20


def load_config(path: str | Path, *, check_references: bool = True) -> Config:
    """Read and validate the configuration file at ``path`` (``-``: standard input, relative
    paths then relative to the current directory); raises ``ConfigError``.

    ``check_references=False`` checks the file without its secrets: ``${env:...}`` and
    ``${file:...}`` references are checked for form only (``validate --no-secrets``)."""
    name = "<stdin>" if str(path) == "-" else str(path)
    base_dir = Path.cwd() if str(path) == "-" else Path(path).resolve().parent
    return load_config_text(_read(path), name, base_dir=base_dir,
                            check_references=check_references)


def load_buffer_path(path: str | Path) -> Path:
    """The buffer file a configuration names (``buffer.path``, else ``<agent.data_dir>/
    buffer.db``), reading nothing else: no secret is resolved and no other option checked.

    For the buffer commands, which an operator runs while the service holds its credentials
    (systemd's LoadCredential files exist only for the running unit)."""
    return _Load(str(path), Path(path).resolve().parent).buffer_path(_read(path))


def _read(path: str | Path) -> str:
    name = str(path)
    stdin = name == "-"
    if stdin:
        name = "<stdin>"
    try:
        if stdin:
            raw = sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1)
        else:
            with Path(path).open("rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read the configuration file: "
                                       f"{exc.strerror or exc}", name)]) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue("", f"the configuration file is larger than "
                                       f"{MAX_CONFIG_BYTES // 2**20} MiB; is it the right "
                                       "file?", name)])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([ConfigIssue("", "the file is not UTF-8 text", name, line,
                                       column)]) from exc
    return text


def load_config_text(text: str, filename: str = "<string>", *,
                     base_dir: Path | None = None, check_references: bool = True) -> Config:
    """Validate configuration ``text``; ``filename`` is only used in messages.

    Relative paths resolve against ``base_dir``: by default the directory of ``filename``
    when it names a file, else the current directory.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue("", f"the configuration is larger than "
                                       f"{MAX_CONFIG_BYTES // 2**20} MiB", filename)])
    if base_dir is None:
        named = not (filename.startswith("<") and filename.endswith(">"))
        base_dir = Path(filename).resolve().parent if named else Path.cwd()
    return _Load(filename, base_dir, check_references).run(text)


def config_hash(config: Config) -> str:
    """sha256 (hex) of the canonical JSON of ``config``; secrets count as their references."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _Load:
    def __init__(self, filename: str, base_dir: Path, check_references: bool = True) -> None:
        self.filename = filename
        self.base_dir = base_dir
        self.check_references = check_references
        self.marks: Marks = {}
        self.data: Any = None
        self.issues: list[ConfigIssue] = []

    def buffer_path(self, text: str) -> Path:
        try:
            data, self.marks, _ = parse_yaml(text)
        except YamlIssue as syntax:
            self._add(syntax.path, syntax.message, syntax.mark)
            self._raise()
        if not isinstance(data, dict):
            self._add((), "the top level must be a mapping of sections (agent, sources, "
                      "machines, sinks, buffer)", self.marks.get(()))
            self._raise()
        # Not an agent configuration at all (a wrong file) is still an error here.
        for key in data:
            if key not in Config.model_fields:
                self._add((key,), f"unknown section '{key}'"
                          f"{suggest(str(key), list(Config.model_fields))}", self._mark((key,)))
        wanted: dict[str, Any] = {}
        for section, key in (("agent", "data_dir"), ("buffer", "path")):
            part = data.get(section)
            if isinstance(part, dict) and part.get(key) is not None:
                wanted[section] = {key: part[key]}
        prepared = prepare(wanted, Config, self.base_dir)
        self.data = prepared.data
        for where, message in prepared.issues:
            self._add(where, message, self._mark(where))
        found: dict[str, Path] = {}
        for section, key in (("agent", "data_dir"), ("buffer", "path")):
            value = prepared.data.get(section, {}).get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                self._add((section, key), "expected a path", self._mark((section, key)))
            else:
                found[section] = Path(value)
        if self.issues:
            self._raise()
        if "buffer" in found:
            return found["buffer"]
        default = AgentSettings.model_fields["data_dir"].default
        return found.get("agent", default) / "buffer.db"

    def run(self, text: str) -> Config:
        try:
            data, self.marks, yaml_issues = parse_yaml(text)
        except YamlIssue as syntax:
            self._add(syntax.path, syntax.message, syntax.mark)
            self._raise()
        for issue in yaml_issues:
            self._add(issue.path, issue.message, issue.mark)
        # An unsupported value was replaced by None: a type error there would only repeat it.
        skip = {issue.path for issue in yaml_issues}
        if data is None:
            self._add((), "the configuration is empty; it needs at least an 'agent' section",
                      (1, 1))
            self._raise()
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else "a single value"
            self._add((), f"the top level must be a mapping of sections (agent, sources, "
                      f"machines, sinks, buffer), not {kind}", self.marks.get(()))
            self._raise()

        prepared = prepare(data, Config, self.base_dir,
                           check_references=self.check_references)
        add_secret_values(prepared.substituted)
        data = self.data = prepared.data
        for path, message in prepared.issues:
            self._add(path, message, self._mark(path))

        config: Config | None = None
        try:
            config = Config.model_validate(
                data, context={"check_references": self.check_references})
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                t = translate(err, data, Config)
                if t.path in prepared.failed or t.path in skip:
                    continue  # already reported (a reference or a value we could not read)
                self._add(t.path, t.message, self._mark(t.anchor))
        self._cross_check(data)
        if self.issues or config is None:
            self._raise()
        return config

    # ------------------------------------------------------------------ cross-references

    def _cross_check(self, data: dict[Any, Any]) -> None:
        """Works on the plain data so these problems are reported even when others are."""
        sources = data.get("sources")
        defined: dict[str, str] = {}  # tag id -> source id
        if isinstance(sources, dict):
            for sid, source in sources.items():
                tags = source.get("tags") if isinstance(source, dict) else None
                for tag in tags if isinstance(tags, dict) else ():
                    if not isinstance(tag, str):
                        continue
                    first = defined.setdefault(tag, str(sid))
                    if first != str(sid):  # YAML reads a source id 123 as a number
                        path = ("sources", sid, "tags", tag)
                        self._add(path, f"tag '{tag}' is defined by both source '{first}' and "
                                  f"source '{sid}'; a tag id must be unique across sources",
                                  self._mark(path))
            self._one_source_per_rtu_line(sources)
        machines = data.get("machines")
        if not isinstance(machines, dict):
            return
        for mid, raw in machines.items():
            try:
                machine = MachineConfig.model_validate(raw)
            except ValidationError:
                continue  # its schema errors are already reported
            for ref_path, tag in machine.tag_refs():
                if tag in defined:
                    continue
                path = ("machines", mid, *ref_path.split("."))
                hint = suggest(tag, list(defined))
                self._add(path, f"machine '{mid}' uses tag '{tag}', which no source "
                          f"defines{hint}", self._mark(path))
            alarms = machine.downtime.alarms
            if alarms is not None and alarms.tag in defined and \
                    not self._is_alarm_tag(sources, defined[alarms.tag], alarms.tag):
                at = ("machines", mid, "downtime", "alarms", "tag")
                self._add(at, f"machine '{mid}' takes reasons from the alarms of tag "
                          f"'{alarms.tag}', which is not an OPC UA tag of kind: alarms "
                          "(its values would never be alarm events)", self._mark(at))
        sinks = data.get("sinks", {})
        if isinstance(sinks, dict):
            self._nats_subject_tokens(data, machines, sinks)
        if machines and isinstance(sinks, dict) and not sinks:
            anchor = ("sinks",) if "sinks" in data else ("machines",)
            self._add(("sinks",), "no sinks configured: the machines' events would only "
                      "accumulate in the buffer; add one under 'sinks'", self._mark(anchor))

    def _nats_subject_tokens(self, data: dict[Any, Any], machines: dict[Any, Any],
                             sinks: dict[Any, Any]) -> None:
        """An id a NATS subject uses must be one subject token: ids may contain '.', which
        NATS reads as a separator (machine 'press.1' of line 'l' and machine '1' of line
        'l.press' would share a subject; 'press.' leaves an empty token no stream covers)."""
        default = NatsSinkConfig.model_fields["subject"].default
        raw_agent = data.get("agent")
        agent: dict[Any, Any] = raw_agent if isinstance(raw_agent, dict) else {}
        for sid, sink in sinks.items():
            if not isinstance(sink, dict) or sink.get("type") != "nats":
                continue
            template = sink.get("subject", default)
            used = placeholders(template) if isinstance(template, str) else frozenset()
            ids: list[tuple[KeyPath, str, Any]] = []
            if "site" in used:
                ids.append((("agent", "site"), "site", agent.get("site")))
            if used & {"agent", "machine"}:  # the agent's own events: machine = agent id
                ids.append((("agent", "id"), "agent id", agent.get("id")))
            for mid, machine in machines.items():
                if "machine" in used:
                    ids.append((("machines", mid), "machine id", mid))
                if "line" in used and isinstance(machine, dict):
                    ids.append((("machines", mid, "line"), "line", machine.get("line")))
            for path, what, value in ids:
                if isinstance(value, str) and "." in value:
                    self._add(path, f"{what} '{value}' contains '.', which splits a NATS "
                              f"subject token: sink '{sid}' (subject '{template}') would "
                              f"publish under a different subject; rename it (letters, digits, "
                              "'_' and '-')", self._mark(path))

    @staticmethod
    def _is_alarm_tag(sources: Any, sid: str, tag: str) -> bool:
        source = next((v for k, v in sources.items() if str(k) == sid), None) \
            if isinstance(sources, dict) else None
        tags = source.get("tags") if isinstance(source, dict) else None
        tag_cfg = tags.get(tag) if isinstance(tags, dict) else None
        return isinstance(tag_cfg, dict) and tag_cfg.get("kind") == "alarms"

    def _one_source_per_rtu_line(self, sources: dict[Any, Any]) -> None:
        """Two sources on one RTU line would poll it in parallel (the line serialises only
        its own requests), and RTU answers carry no transaction id: they would collide."""
        lines: dict[str, str] = {}  # serial device or gateway host:port -> source id
        for sid, source in sources.items():
            if not isinstance(source, dict) or source.get("type") != "modbus":
                continue
            transport, serial = source.get("transport"), source.get("serial")
            path: KeyPath
            if transport == "serial" and isinstance(serial, dict):
                line, path = str(serial.get("device")), ("sources", sid, "serial", "device")
            elif transport == "rtu-over-tcp" and source.get("host") is not None:
                line = f"{source['host']}:{source.get('port', 502)}"
                path = ("sources", sid, "host")
            else:
                continue
            first = lines.setdefault(line, str(sid))
            if first != str(sid):
                self._add(path, f"sources '{first}' and '{sid}' both use the RTU line {line}: "
                          "requests on one line must go one at a time, so put all devices of "
                          "a line in one source (each tag names its unit_id)", self._mark(path))

    # ------------------------------------------------------------------ issues

    def _mark(self, path: KeyPath) -> Mark | None:
        """The mark of ``path`` or of its nearest ancestor present in the file."""
        for n in range(len(path), -1, -1):
            mark = self.marks.get(path[:n])
            if mark is not None:
                return mark
        return None

    def _add(self, path: KeyPath, message: str, mark: Mark | None) -> None:
        line, column = mark if mark else (None, None)
        issue = ConfigIssue(dotted(path, self.data), message, self.filename, line, column)
        if issue not in self.issues:
            self.issues.append(issue)

    def _raise(self) -> NoReturn:
        # A message may quote a value that came from ${env:}/${file:} (an invalid URL).
        ordered = sorted((dataclasses.replace(i, message=redact(i.message)) for i in self.issues),
                         key=lambda i: (i.line or 0, i.column or 0))
        # from None: a pydantic ValidationError as the cause would print the raw input,
        # which may hold substituted values; every problem is in the issues already.
        raise ConfigError(ordered) from None
