"""``edge-agent probe``: connect each configured source, read every tag once, print a table.

Works for every protocol through ``Source.probe()``; a source that offers ``probe_report()``
(a Modbus RTU line: answers and frame errors per unit id) adds its lines under its table.
Sources are probed concurrently, each with its own deadline, so one unreachable device neither
hides nor delays the others' answers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent.wiring.build import build_source
from agent.wiring.schema import Config
from config.errors import EdgeAgentError
from config.model import TagSample, format_time

__all__ = ["ProbeResult", "format_results", "probe_sources"]


@dataclass
class ProbeResult:
    source: str
    samples: list[TagSample] = field(default_factory=list)
    error: str | None = None
    # Protocol-specific lines after the table (per unit id and frame errors of an RTU line).
    report: list[str] = field(default_factory=list)


async def _probe_one(name: str, config: Config, deadline: float) -> ProbeResult:
    source = build_source(name, config.sources[name])
    try:
        async with asyncio.timeout(deadline):
            samples = await source.probe()
        report = getattr(source, "probe_report", None)
        return ProbeResult(name, samples, report=report() if callable(report) else [])
    except TimeoutError:
        return ProbeResult(name, error=f"no answer within {deadline:g}s")
    except EdgeAgentError as exc:
        return ProbeResult(name, error=str(exc) or type(exc).__name__)


async def probe_sources(config: Config, only: list[str] | None = None,
                        deadline: float = 30.0) -> list[ProbeResult]:
    """Probe ``only`` (default: every source); raises KeyError for an unknown source id."""
    names = only or list(config.sources)
    for n in names:
        if n not in config.sources:
            raise KeyError(n)
    return list(await asyncio.gather(*(_probe_one(n, config, deadline) for n in names)))


def _cell(s: TagSample) -> list[str]:
    value = "-" if s.value is None else repr(s.value) if isinstance(s.value, str) else str(s.value)
    kind = "-" if s.value is None else type(s.value).__name__
    when = format_time(s.source_time) if s.source_time else format_time(s.agent_time) + " (agent)"
    return [s.tag, value, kind, s.quality.value, when, s.detail or ""]


def format_results(results: list[ProbeResult]) -> str:
    """A readable table per source: tag, value, type, quality, timestamp, detail."""
    lines: list[str] = []
    header = ["TAG", "VALUE", "TYPE", "QUALITY", "TIMESTAMP", "DETAIL"]
    for r in results:
        lines.append(f"source {r.source}: " + (f"UNREACHABLE: {r.error}" if r.error
                                                else f"{len(r.samples)} tag(s)"))
        if r.error:
            lines.append("")
            continue
        rows = [header, *(_cell(s) for s in r.samples)]
        widths = [min(40, max(len(row[i]) for row in rows)) for i in range(len(header) - 1)]
        for row in rows:
            cells = [row[i].ljust(widths[i]) for i in range(len(widths))]
            lines.append("  " + "  ".join([*cells, row[-1]]).rstrip())
        lines.extend(f"  {line}" for line in r.report)
        lines.append("")
    return "\n".join(lines)
