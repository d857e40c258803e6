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

import hashlib
import json
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from agent.detect.config import MachineConfig
from agent.wiring.schema import Config
from config._messages import dotted, suggest, translate
from config._refs import prepare
from config._yamlmarks import Mark, Marks, YamlIssue, parse_yaml
from config._yamlmarks import Path as KeyPath
from config.errors import ConfigError, ConfigIssue

__all__ = ["config_hash", "load_config", "load_config_text"]


def load_config(path: str | Path) -> Config:
    """Read and validate the configuration file at ``path``; raises ``ConfigError``."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read the configuration file: "
                                       f"{exc.strerror or exc}", name)]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([ConfigIssue("", "the file is not UTF-8 text", name, line,
                                       column)]) from exc
    return load_config_text(text, name, base_dir=Path(path).resolve().parent)


def load_config_text(text: str, filename: str = "<string>", *,
                     base_dir: Path | None = None) -> Config:
    """Validate configuration ``text``; ``filename`` is only used in messages.

    Relative paths resolve against ``base_dir``: by default the directory of ``filename``
    when it names a file, else the current directory.
    """
    if base_dir is None:
        named = not (filename.startswith("<") and filename.endswith(">"))
        base_dir = Path(filename).resolve().parent if named else Path.cwd()
    return _Load(filename, base_dir).run(text)


def config_hash(config: Config) -> str:
    """sha256 (hex) of the canonical JSON of ``config``; secrets count as their references."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class _Load:
    def __init__(self, filename: str, base_dir: Path) -> None:
        self.filename = filename
        self.base_dir = base_dir
        self.marks: Marks = {}
        self.data: Any = None
        self.issues: list[ConfigIssue] = []

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

        prepared = prepare(data, Config, self.base_dir)
        data = self.data = prepared.data
        for path, message in prepared.issues:
            self._add(path, message, self._mark(path))

        config: Config | None = None
        try:
            config = Config.model_validate(data)
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
                    if first != sid:
                        path = ("sources", sid, "tags", tag)
                        self._add(path, f"tag '{tag}' is defined by both source '{first}' and "
                                  f"source '{sid}'; a tag id must be unique across sources",
                                  self._mark(path))
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
        sinks = data.get("sinks", {})
        if machines and isinstance(sinks, dict) and not sinks:
            anchor = ("sinks",) if "sinks" in data else ("machines",)
            self._add(("sinks",), "no sinks configured: the machines' events would only "
                      "accumulate in the buffer; add one under 'sinks'", self._mark(anchor))

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
        ordered = sorted(self.issues, key=lambda i: (i.line or 0, i.column or 0))
        # from None: a pydantic ValidationError as the cause would print the raw input,
        # which may hold substituted values; every problem is in the issues already.
        raise ConfigError(ordered) from None
