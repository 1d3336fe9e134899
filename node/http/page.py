"""HTML of the status page and of a job's detail: server-rendered, every value escaped, no external assets.

The page refreshes itself with ``<meta http-equiv="refresh">``. Its one script (allowed by a per-response
nonce in the Content-Security-Policy, see :mod:`node.http.server`) marks each thumbnail once the browser
has decoded it: ``data-loaded="WIDTHxHEIGHT"`` (or ``"error"``), which tests and curious administrators
can read from the DOM. Figures carry ``data-figure`` attributes and job rows ``data-job-id``,
``data-status`` and ``data-consensus``, so that a script can read the page without scraping text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from html import escape
from typing import Any

from gradcam.results import format_pair
from node.db import JobStatus, SendStatus
from node.http.status import Overview
from node.ops.report import consensus_word

__all__ = ["REFRESH_S", "overview_page", "job_page", "message_page"]

REFRESH_S = 10
_DISCLAIMER = "AI research output - not for diagnostic use"

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f4f5f7}
header{background:#1f3a5f;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:baseline;
flex-wrap:wrap}
header h1{font-size:18px;margin:0}header a{color:#fff}
.disclaimer{background:#fff3cd;color:#664d03;padding:4px 18px;font-weight:600}
main{padding:14px 18px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:12px;margin-bottom:16px}
.card{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:10px 12px}
.card.wide{grid-column:span 2}
.card h2{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:#57606a;margin:0 0 6px}
.big{font-size:28px;font-weight:700}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border-bottom:1px solid #e3e6ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}
.card table{background:none}.card td,.card th{padding:2px 6px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.uid{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
img.thumb{max-width:256px;max-height:256px;display:block;background:#000}
#jobs img.thumb{max-height:160px}
.status-done{color:#1a7f37}.status-failed{color:#cf222e;font-weight:600}.status-skipped{color:#6e7781}
.status-queued,.status-running{color:#9a6700}
.positive{color:#cf222e;font-weight:600}.negative{color:#1a7f37}
.error{color:#cf222e}.low{color:#cf222e;font-weight:700}
.worker-alive{color:#1a7f37}.worker-silent{color:#cf222e;font-weight:600}.worker-stopped{color:#6e7781}
meter{width:100%}
footer{color:#57606a;padding:8px 18px 18px;font-size:12px}
"""

_MARK_DECODED = """
for (const img of document.querySelectorAll("img.thumb")) {
  const mark = () => {
    img.dataset.loaded = img.naturalWidth ? img.naturalWidth + "x" + img.naturalHeight : "error";
  };
  if (img.complete) { mark(); } else {
    img.addEventListener("load", mark);
    img.addEventListener("error", mark);
  }
}
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


def _when(iso: str | None) -> str:
    return "-" if not iso else _e(iso[:19].replace("T", " "))


def _utc(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def _figure(name: str, value: object, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<span data-figure="{_e(name)}"{cls}>{_e(value)}</span>'


def _thumb(output_id: int | None, what: str) -> str:
    if output_id is None:
        return '<span class="none">-</span>'
    return (
        f'<a href="/thumb/{int(output_id)}.png"><img class="thumb" src="/thumb/{int(output_id)}.png" '
        f'alt="{_e(what)}" data-output-id="{int(output_id)}"></a>'
    )


def _document(title: str, heading: str, body: str, nonce: str, refresh: bool = True) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'{meta}<meta name="referrer" content="no-referrer"><title>{_e(title)}</title>'
        f'<style nonce="{_e(nonce)}">{_CSS}</style></head><body>'
        f'<header><h1>{heading}</h1><a href="/">status</a><a href="/metrics">metrics</a>'
        f'<a href="/healthz">health</a></header>'
        f'<div class="disclaimer">{_e(_DISCLAIMER)}</div>'
        f"<main>{body}</main>"
        f"<footer>gradcam-node. {'Refreshes every ' + str(REFRESH_S) + ' s. ' if refresh else ''}"
        "Times are UTC. Patient names and IDs are never shown.</footer>"
        f'<script nonce="{_e(nonce)}">{_MARK_DECODED}</script>'
        "</body></html>\n"
    )


def _status_table(counts: Mapping[str, int], window: str) -> str:
    rows = "".join(
        f'<tr><td class="status-{s.value}">{s.value}</td>'
        f'<td class="num">{_figure(f"jobs-{window}-{s.value}", counts.get(s.value, 0))}</td></tr>'
        for s in JobStatus
    )
    return f"<table>{rows}</table>"


def _holders(o: Overview) -> str:
    """Which worker processes run the running jobs; one whose lease ran out is gone (its jobs are taken
    over by another worker)."""
    return "".join(
        f'<br><span class="holder{" error" if h.expired else ""}" data-worker="{_e(h.worker)}">'
        f"{_e(h.worker)}: {int(h.jobs)} job(s){', lease expired: worker gone?' if h.expired else ''}</span>"
        for h in o.holders
    )


def _workers_card(o: Overview) -> str:
    """Every analysis worker process seen in the last day: where its models run, whether it is alive, and
    what it did since it started. A silent one stopped renewing without saying it stopped: gone."""
    rows = "".join(
        f'<tr data-worker="{_e(w.worker)}"><td>{_e(w.worker)}</td><td>{_e(w.device)}</td>'
        f'<td class="worker-{_e(w.state)}" data-figure="worker-state">{_e(w.state)}'
        f"{' (gone?)' if w.state == 'silent' else ''}</td>"
        f'<td class="num">{_e(_age((o.now - w.seen_at).total_seconds()))} ago</td>'
        f'<td class="num">{int(w.jobs_done)}</td><td class="num">{int(w.jobs_failed)}</td></tr>'
        for w in o.workers
    )
    alive = sum(w.state == "alive" for w in o.workers)
    body = (
        f"<table><tr><th>worker</th><th>device</th><th>state</th><th>seen</th>"
        f'<th class="num">done</th><th class="num">failed</th></tr>{rows}</table>'
        if rows
        else "no worker has reported yet"
    )
    return f'<div class="card wide"><h2>Workers ({_figure("workers-alive", alive)} alive)</h2>{body}</div>'


def _cards(o: Overview) -> str:
    oldest = "none queued"
    if o.oldest_queued_job is not None:
        oldest = (
            f'oldest: <a href="/job/{int(o.oldest_queued_job)}">job {int(o.oldest_queued_job)}</a>, '
            f"{_figure('oldest-queued-age', _age(o.oldest_queued_age_s))} ago"
        )
    queue = (
        f'<div class="card"><h2>Queue</h2><div class="big">{_figure("queue-depth", o.queue_depth)}</div>'
        f"queued, {_figure('running', o.running)} running<br>{oldest}{_holders(o)}</div>"
    )
    hour = f'<div class="card"><h2>Jobs received, last hour</h2>{_status_table(o.last_hour, "hour")}</div>'
    day = f'<div class="card"><h2>Jobs received, last 24 h</h2>{_status_table(o.last_day, "day")}</div>'
    models = "".join(
        f'<tr data-model="{_e(m.model)}"><td>{_e(m.model)}</td>'
        f'<td class="num">{_figure(f"model-{m.model}-analysed", m.analysed)}</td>'
        f'<td class="num">{_figure(f"model-{m.model}-positive", m.positive)}</td>'
        f'<td class="num">{m.rate:.0%}</td></tr>'
        for m in o.models
    )
    models_card = (
        '<div class="card wide"><h2>Models, last 24 h</h2><table><tr><th>model</th>'
        '<th class="num">images</th>'
        f'<th class="num">positive</th><th class="num">rate</th></tr>{models or ""}</table>'
        f"{'' if models else 'no decisions yet'}</div>"
    )
    sends = o.sends
    send_rows = "".join(
        f"<tr><td>{s.value}</td>"
        f'<td class="num">{_figure(f"sends-{s.value}", sends.by_status.get(s.value, 0))}</td></tr>'
        for s in SendStatus
    )
    last_error = ""
    if sends.last_error is not None:
        last_error = (
            f'<div class="error">last error ({_e(sends.last_error_destination)}, '
            f'<a href="/job/{int(sends.last_error_job or 0)}">job {_e(sends.last_error_job)}</a>, '
            f"{_utc(sends.last_error_at)}): "
            f'<span data-figure="sends-last-error">{_e(sends.last_error)}</span></div>'
        )
    outbox = f'<div class="card"><h2>Sends</h2><table>{send_rows}</table>{last_error}</div>'
    d = o.disk
    if d.free_bytes is None:
        disk_body = f'<span class="error">cannot read free space: {_e(d.error)}</span>'
    else:
        top = max(d.free_bytes, 4 * d.reserve_bytes, 1)
        disk_body = (
            f'<div class="big{" low" if d.low else ""}">{_e(_bytes(d.free_bytes))}</div>'
            f"free, reserve {_e(_bytes(d.reserve_bytes))}<br>"
            f'<meter min="0" max="{top}" low="{2 * d.reserve_bytes}" optimum="{top}" '
            f'value="{d.free_bytes}" data-figure="disk-free-bytes" data-value="{d.free_bytes}"></meter>'
        )
    disk = (
        f'<div class="card"><h2>Disk</h2>{disk_body}<div class="uid">{_e(d.folder)}</div>'
        f'<span hidden data-figure="disk-reserve-bytes">{d.reserve_bytes}</span></div>'
    )
    return f'<div class="cards">{queue}{hour}{day}{models_card}{_workers_card(o)}{outbox}{disk}</div>'


def _shown(m: Mapping[str, Any]) -> tuple[str, str]:
    """A result's probability (4 decimals) and threshold, never contradicting its decision."""
    return format_pair(m["probability"], m["threshold"], 4, threshold_as_set=True)


def _models_cell(results: Iterable[Mapping[str, Any]]) -> str:
    parts = []
    for m in results:
        sign = "&ge;" if m["positive"] else "&lt;"
        css = "positive" if m["positive"] else "negative"
        p, t = format_pair(m["probability"], m["threshold"], threshold_as_set=True)
        parts.append(f'<span class="{css}">{_e(m["model"])} {p} {sign} {t}</span>')
    return "<br>".join(parts) or "-"


def _sends_cell(sends: Iterable[Mapping[str, Any]]) -> str:
    parts = []
    for s in sends:
        text = f"{_e(s['destination'])}: {_e(s['status'])} ({int(s['attempts'])})"
        if s["last_error"] and s["status"] != "sent":
            text += f'<div class="error">{_e(s["last_error"])}</div>'
        parts.append(text)
    return "<br>".join(parts) or "-"


def _job_row(r: Mapping[str, Any]) -> str:
    inst = r["instance"]
    job_id = int(r["job_id"])
    consensus = consensus_word(r["consensus"])
    duration = "-" if r["duration_ms"] is None else f"{r['duration_ms']:.0f}"
    reason = f'<div class="error">{_e(r["reason"])}</div>' if r["reason"] else ""
    return (
        f'<tr class="job" data-job-id="{job_id}" data-status="{_e(r["status"])}" '
        f'data-consensus="{_e(consensus)}">'
        f"<td>{_thumb(r.get('thumbnail'), f'summary of job {job_id}')}</td>"
        f'<td class="num"><a href="/job/{job_id}">{job_id}</a></td>'
        f"<td>{_when(inst['received_at'])}</td>"
        f'<td class="status-{_e(r["status"])}">{_e(r["status"])}{reason}</td>'
        f"<td>{_e(inst['modality'] or '-')}</td><td>{_e(inst['calling_ae'])}</td>"
        f'<td class="num">{int(r["attempts"])}</td><td class="num">{duration}</td>'
        f'<td class="{_e(consensus)}">{_e(consensus)}</td>'
        f"<td>{_models_cell(r['results'])}</td><td>{_sends_cell(r['sends'])}</td>"
        f'<td class="uid">{_e(inst["sop_instance_uid"])}</td></tr>'
    )


def overview_page(o: Overview, node_title: str, nonce: str) -> str:
    """The status page: figures, then the most recent jobs with their summary picture."""
    rows = "".join(_job_row(r) for r in o.recent)
    table = (
        f'<h2>Last {len(o.recent)} jobs</h2><table id="jobs"><tr><th>picture</th><th class="num">job</th>'
        "<th>received</th><th>status</th><th>mod</th><th>from</th><th class='num'>att</th>"
        "<th class='num'>ms</th><th>consensus</th><th>models</th><th>sends</th><th>instance</th></tr>"
        f"{rows}</table>"
        if o.recent
        else '<p id="jobs">No jobs yet.</p>'
    )
    heading = f"{_e(node_title)} <small>updated {_utc(o.now)}</small>"
    return _document(f"{node_title} status", heading, _cards(o) + table, nonce)


def _rows(pairs: Iterable[tuple[str, object]]) -> str:
    return "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs)


def job_page(r: Mapping[str, Any], node_title: str, nonce: str) -> str:
    """One job: instance, association, results, outputs (with pictures), sends with every attempt."""
    inst, job_id = r["instance"], int(r["job_id"])
    job = _rows(
        [
            (
                "status",
                f'<span class="status-{_e(r["status"])}" data-figure="status">{_e(r["status"])}</span>',
            ),
            ("reason", _e(r["reason"] or "-")),
            ("consensus", _figure("consensus", consensus_word(r["consensus"]))),
            ("attempts", _e(r["attempts"])),
            (
                "created / started / finished",
                " / ".join(_when(r[k]) for k in ("created_at", "started_at", "finished_at")),
            ),
            ("duration", "-" if r["duration_ms"] is None else f"{r['duration_ms']:.0f} ms"),
            ("reply to AE", _e(r["reply_ae"])),
            ("configuration key", f'<span class="uid">{_e(r["content_key"] or "-")}</span>'),
        ]
    )
    instance = _rows(
        [
            ("SOP Instance UID", f'<span class="uid">{_e(inst["sop_instance_uid"])}</span>'),
            ("SOP Class UID", f'<span class="uid">{_e(inst["sop_class_uid"])}</span>'),
            ("Study Instance UID", f'<span class="uid">{_e(inst["study_instance_uid"])}</span>'),
            ("Series Instance UID", f'<span class="uid">{_e(inst["series_instance_uid"])}</span>'),
            ("modality", _e(inst["modality"] or "-")),
            ("transfer syntax", f'<span class="uid">{_e(inst["transfer_syntax"])}</span>'),
            ("from AE", _e(inst["calling_ae"])),
            ("received", f"{_when(inst['received_at'])} ({int(inst['times_received'])}x)"),
            ("spool file", f'<span class="uid">{_e(inst["path"])}</span>'),
        ]
    )
    a = r.get("association")
    association = (
        "<p>none recorded</p>"
        if a is None
        else "<table>"
        + _rows(
            [
                ("association", _e(a["id"])),
                ("calling / called AE", f"{_e(a['calling_ae'])} / {_e(a['called_ae'])}"),
                ("peer", _e(a["peer"])),
                ("status", _e(a["status"]) + (f" ({_e(a['reason'])})" if a["reason"] else "")),
                ("started", _when(a["started_at"])),
                ("stored / refused", f"{int(a['n_received'])} / {int(a['n_failed'])}"),
            ]
        )
        + "</table>"
    )
    results = "".join(
        f'<tr data-model="{_e(m["model"])}"><td>{_e(m["model"])}</td>'
        f'<td class="num">{_shown(m)[0]}</td>'
        f'<td class="num">{_shown(m)[1]}</td>'
        f'<td class="{"positive" if m["positive"] else "negative"}">'
        f"{'positive' if m['positive'] else 'negative'}</td>"
        f'<td class="num">{_e(m["cam_peak"])}</td><td class="num">{m["ms"]:.0f}</td></tr>'
        for m in r["results"]
    )
    outputs = "".join(
        f'<tr data-output-id="{int(o["id"])}"><td>{_thumb(o.get("thumbnail"), o["kind"])}</td>'
        f"<td>{_e(o['kind'])}</td><td>{_e(o['model'] or '-')}</td>"
        f'<td class="uid">{_e(o["sop_instance_uid"])}<br>series {_e(o["series_instance_uid"])}'
        f"{'<br>supersedes ' + _e(o['supersedes']) if o['supersedes'] else ''}</td>"
        f'<td class="uid">{_e(o["path"])}</td></tr>'
        for o in r["outputs"]
    )
    sends = ""
    for s in r["sends"]:
        attempts = "".join(
            f"<tr><td>{_when(at['started_at'])}</td><td>{_when(at['finished_at'])}</td>"
            f"<td>{_e(at['outcome'])}</td><td>{_e(at['detail'])}</td></tr>"
            for at in s["attempts_log"]
        )
        sends += (
            f"<h3>to {_e(s['destination'])} ({_e(s['ae_title'])} at {_e(s['host'])}:{int(s['port'])}): "
            f'<span data-figure="send-{_e(s["destination"])}">{_e(s["status"])}</span>, '
            f"{int(s['attempts'])} attempt(s), sent {_when(s['sent_at'])}</h3>"
            + (
                "<table><tr><th>started</th><th>finished</th><th>outcome</th><th>detail</th></tr>"
                f"{attempts}</table>"
                if attempts
                else "<p>no attempt yet</p>"
            )
        )
    body = (
        f'<h2>Job <span data-figure="job-id">{job_id}</span></h2><table>{job}</table>'
        f"<h2>Instance</h2><table>{instance}</table><h2>Association</h2>{association}"
        "<h2>Results</h2>"
        + (
            "<table><tr><th>model</th><th class='num'>p</th><th class='num'>threshold</th><th>decision</th>"
            f"<th class='num'>CAM peak</th><th class='num'>ms</th></tr>{results}</table>"
            if results
            else "<p>none</p>"
        )
        + "<h2>Outputs</h2>"
        + (
            "<table><tr><th>picture</th><th>kind</th><th>model</th><th>SOP Instance UID</th>"
            "<th>file</th></tr>"
            f"{outputs}</table>"
            if outputs
            else "<p>none</p>"
        )
        + "<h2>Sends</h2>"
        + (sends or "<p>none</p>")
    )
    heading = f'{_e(node_title)}: job {job_id} <small><a href="/">back to status</a></small>'
    return _document(f"{node_title} job {job_id}", heading, body, nonce)


def message_page(title: str, message: str, nonce: str) -> str:
    """A short page for 404 and the like (no refresh)."""
    return _document(title, _e(title), f"<p>{_e(message)}</p>", nonce, refresh=False)
