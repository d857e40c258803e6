"""The read-only status page served at ``/`` on the health listener.

One HTML document rendered from the ``/status`` document: a tile per machine in the colour of
its state (time in state, open downtime and its reason, order, last event), a timeline of the
last shift's downtime per machine (from ``recent_downtime`` plus the open episode), the sources
and the sinks with their backlog.

Rules: no external assets (fonts, scripts, styles are inline or the browser's own), no
JavaScript at all (the page refreshes itself with ``<meta http-equiv="refresh">``), every value
escaped. Each machine tile carries ``data-machine`` and ``data-state`` so tests (and scrapers)
read the state without parsing text.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from html import escape
from typing import Any

from agent.detect.history import SHIFT_SECONDS
from config.model import parse_time, utcnow

__all__ = ["REFRESH_SECONDS", "STATE_COLOURS", "reason_label", "render_page"]

REFRESH_SECONDS = 5
STATE_COLOURS = {"running": "#2e7d32", "idle": "#f9a825", "down": "#c62828",
                 "planned": "#1565c0", "unknown": "#757575"}
_CATEGORY_COLOURS = {"unplanned": STATE_COLOURS["down"], "idle": STATE_COLOURS["idle"],
                     "planned": STATE_COLOURS["planned"]}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem 1.5rem;background:#f4f5f7;color:#1b1f24}
h1{font-size:1.3rem;margin:0 0 .3rem}h2{font-size:1.05rem;margin:1.4rem 0 .5rem}
.meta{color:#555;font-size:.85rem}.ready{color:#2e7d32;font-weight:600}
.notready{color:#c62828;font-weight:600}ul.reasons{color:#c62828;margin:.3rem 0}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(17rem,1fr));gap:.8rem}
.tile{border-radius:.5rem;padding:.7rem .9rem;color:#fff;box-shadow:0 1px 3px #0003}
.tile h3{margin:0;font-size:1.1rem}.tile .state{font-size:1.5rem;font-weight:700;
text-transform:uppercase;letter-spacing:.04em}.tile p{margin:.15rem 0;font-size:.85rem}
.tile.idle{color:#1b1f24}
table{border-collapse:collapse;background:#fff;font-size:.85rem;min-width:40rem}
th,td{padding:.3rem .6rem;border-bottom:1px solid #ddd;text-align:left}
th{background:#e8eaed}td.num{text-align:right;font-variant-numeric:tabular-nums}
.timeline{background:#fff;padding:.4rem .6rem;border-radius:.4rem;max-width:60rem}
.row{display:flex;align-items:center;gap:.6rem;margin:.2rem 0}
.row .name{width:9rem;font-size:.85rem;overflow:hidden;text-overflow:ellipsis}
.row svg{flex:1;height:1.2rem;background:#e3f1e4;border-radius:.2rem}
.axis{display:flex;justify-content:space-between;margin-left:9.6rem;font-size:.75rem;
color:#555}.bad{color:#c62828;font-weight:600}.good{color:#2e7d32}
"""


def render_page(doc: dict[str, Any], now: datetime | None = None) -> str:
    """The whole page for one ``/status`` document (``now`` defaults to its ``time``)."""
    now = now or _time(doc.get("time")) or utcnow()
    ready = bool(doc.get("ready"))
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{_e(doc.get('agent_id'))} - edge agent</title><style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>Edge agent {_e(doc.get('agent_id'))} at site {_e(doc.get('site'))}: "
        f'<span id=readiness class="{"ready" if ready else "notready"}">'
        f"{'READY' if ready else 'NOT READY'}</span></h1>",
        f"<div class=meta>version {_e(doc.get('version'))} &middot; up "
        f"{_e(age_text(doc.get('uptime_s')))} &middot; config "
        f"{_e(str(doc.get('config_hash') or '-')[:12])} &middot; as of {_e(doc.get('time'))}"
        f" &middot; refreshes every {REFRESH_SECONDS}s</div>",
    ]
    reasons = doc.get("readiness_reasons") or []
    if reasons:
        parts.append("<ul class=reasons>" + "".join(f"<li>{_e(r)}</li>" for r in reasons)
                     + "</ul>")
    machines: dict[str, Any] = doc.get("machines") or {}
    parts.append("<h2>Machines</h2><div class=tiles>")
    parts += [_tile(mid, m, now) for mid, m in machines.items()]
    parts.append("</div>")
    hours = SHIFT_SECONDS / 3600
    # Every time on the page is the agent's UTC (as in /status): the axis says so.
    parts.append(f"<h2>Downtime, last {hours:g} hours (UTC)</h2>"
                 "<div class=timeline id=timeline>")
    parts += [_timeline(mid, m, now) for mid, m in machines.items()]
    marks = [(now - timedelta(seconds=SHIFT_SECONDS * (1 - i / 4))).strftime("%H:%M")
             for i in range(5)]
    parts.append("<div class=axis>" + "".join(f"<span>{m}</span>" for m in marks)
                 + "</div></div>")
    parts.append(_sources(doc))
    parts.append(_sinks(doc))
    parts.append("</body></html>")
    return "".join(parts)


def _tile(mid: str, m: dict[str, Any], now: datetime) -> str:
    state = str(m.get("state") or "unknown")
    colour = STATE_COLOURS.get(state, STATE_COLOURS["unknown"])
    since = _time(m.get("since"))
    lines = [f"<p>for {_e(age_text((now - since).total_seconds()) if since else '-')}"
             f"{'' if m.get('signal') in (None, 'ok') else ' &middot; signal ' + _e(m['signal'])}"
             "</p>"]
    ep = m.get("open_downtime")
    if isinstance(ep, dict):
        start = _time(ep.get("started_at"))
        lines.append(f"<p class=downtime>open {_e(ep.get('category'))} downtime "
                     f"{_e(age_text((now - start).total_seconds()) if start else '')}, "
                     f"{_e(reason_label(ep))}</p>")
    if m.get("order_id"):
        lines.append(f"<p>order {_e(m['order_id'])}</p>")
    last = m.get("last_event")
    if isinstance(last, dict):
        lines.append(f"<p>last event {_e(last.get('type'))} at {_e(last.get('time'))}</p>")
    return (f'<section class="tile {_e(state)}" data-machine="{_e(mid)}" '
            f'data-state="{_e(state)}" style="background:{colour}">'
            f"<h3>{_e(mid)}</h3><div class=state>{_e(state)}</div>{''.join(lines)}</section>")


def _timeline(mid: str, m: dict[str, Any], now: datetime) -> str:
    """One SVG bar: 0..1000 is the last shift; a rect per downtime episode in it."""
    start = now - timedelta(seconds=SHIFT_SECONDS)
    episodes = list(m.get("recent_downtime") or [])
    ep = m.get("open_downtime")
    if isinstance(ep, dict):
        episodes.append({**ep, "ended_at": None})
    rects = []
    for e in episodes:
        a, b = _time(e.get("started_at")), _time(e.get("ended_at")) or now
        if a is None or b < start:
            continue
        x = max(0.0, (a - start).total_seconds()) / SHIFT_SECONDS * 1000
        w = max(2.0, (b - max(a, start)).total_seconds() / SHIFT_SECONDS * 1000)
        colour = _CATEGORY_COLOURS.get(str(e.get("category")), STATE_COLOURS["unknown"])
        tip = (f"{e.get('category')} {e.get('started_at')} - {e.get('ended_at') or 'now'}, "
               f"{reason_label(e)}")
        rects.append(f'<rect class=episode x="{x:.1f}" y="0" width="{w:.1f}" height="10" '
                     f'fill="{colour}"><title>{_e(tip)}</title></rect>')
    return (f'<div class=row data-machine="{_e(mid)}" data-episodes="{len(rects)}">'
            f"<span class=name>{_e(mid)}</span>"
            f'<svg viewBox="0 0 1000 10" preserveAspectRatio="none">{"".join(rects)}</svg></div>')


def _sources(doc: dict[str, Any]) -> str:
    rows = []
    for name, s in (doc.get("sources") or {}).items():
        up = s.get("state") == "up"
        bad = s.get("bad_tags") or {}
        rows.append(
            f'<tr data-source="{_e(name)}"><td>{_e(name)}</td>'
            f'<td class="{"good" if up else "bad"}">{_e(s.get("state"))}</td>'
            f'<td class=num>{_e(age_text(s.get("last_sample_age_s")))}</td>'
            f'<td class=num>{len(bad)}</td><td>{_e(", ".join(sorted(bad))[:80])}</td>'
            f'<td>{_e(str(s.get("last_error") or "")[:100]) if not up else ""}</td></tr>')
    return ("<h2>Sources</h2><table id=sources><tr><th>source</th><th>state</th>"
            "<th>last sample</th><th>bad tags</th><th>which</th><th>last error</th></tr>"
            + "".join(rows) + "</table>")


def _sinks(doc: dict[str, Any]) -> str:
    backlog = ((doc.get("buffer") or {}).get("sinks")) or {}
    rows = []
    for name, s in (doc.get("sinks") or {}).items():
        b = backlog.get(name) or {}
        state = str(s.get("state"))
        problem = s.get("held_reason") or s.get("last_error") or ""
        rows.append(
            f'<tr data-sink="{_e(name)}"><td>{_e(name)}</td>'
            f'<td class="{"bad" if state in ("held", "retrying") else "good"}">{_e(state)}</td>'
            f'<td class=num>{_e(b.get("pending", "-"))}</td>'
            f'<td class=num>{_e(b.get("leased", "-"))}</td>'
            f'<td class=num>{_e(b.get("dead_letters", "-"))}</td>'
            f'<td class=num>{_e(age_text(b.get("oldest_pending_age_s")))}</td>'
            f'<td class=num>{_e(s.get("delivered_total", "-"))}</td>'
            f"<td>{_e(str(problem)[:100])}</td></tr>")
    return ("<h2>Sinks</h2><table id=sinks><tr><th>sink</th><th>state</th><th>pending</th>"
            "<th>leased</th><th>dead letters</th><th>oldest pending</th><th>delivered</th>"
            "<th>problem</th></tr>" + "".join(rows) + "</table>")


def reason_label(ep: dict[str, Any]) -> str:
    """'reason 7 (Bottle jam)', 'reason 7' or 'no reason yet' for an episode of /status."""
    code, text = ep.get("reason_code"), ep.get("reason")
    if not code:
        return "no reason yet"
    return f"reason {code}" + (f" ({text})" if text and text != code else "")


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None


def age_text(seconds: Any) -> str:
    """A duration for people: 42s, 12m, 3.5h, 2.0d; '-' when unknown."""
    if not isinstance(seconds, int | float):
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
