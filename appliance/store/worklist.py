"""The worklist: one page of studies with their state, triage and review, in a fixed number of queries.

The one way studies are listed: the web worklist and /api/v1/studies page through `query_worklist`,
`edgescreen studies` takes `list_studies` (the same rows, every series of each study beside them). A
study's state is derived from its series and jobs:

* running      a job of the study is running (stage, progress)
* waiting      a job is queued; `reason` is what the gate said the last time the worker looked
* receiving    images are still arriving, or the series is complete and about to be routed
* failed       a job failed (reason: its error)
* quarantined  the study's job or every series was quarantined (reason)
* done         every job is done
* not_analysed no pipeline applies (reason: the assembly's words, e.g. "MG For Processing")

When a study has several jobs the most pressing one speaks for it (running > waiting > receiving >
failed > quarantined > done); triage is the worst result (suspicious > indeterminate > not suspicious),
and a study is reviewed when every result is.

Deriving that for 10,000 studies on every page costs ~100 ms of CPU on the 2-core box, and the page must
answer 20 clients while an analysis runs. So the derivation is kept in the `worklist` table (migration 6)
by SQLite triggers on studies, series, jobs and results: every process that changes them (DICOM service,
worker, CLI, web) updates the derived row in the same transaction, with no code of theirs involved. The
triggers are installed here, not in the migration, because the migration runner splits statements on ';'
and a trigger body needs one; `ensure_worklist` installs them when they are missing (first use, or a later
migration that rebuilt a table and dropped them) and rebuilds the table in the same transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgescreen.appliance.store.db import Store

STATES = ("receiving", "waiting", "running", "done", "failed", "quarantined", "not_analysed")
TRIAGES = ("suspicious", "indeterminate", "not_suspicious")
SORTS = {
    "received": "w.received_at", "patient": "st.patient_name COLLATE NOCASE", "study_date": "st.study_date",
    "modality": "st.modalities", "state": "w.state_rank", "triage": "w.triage_rank",
}
MAX_PER_PAGE = 200
TRIGGER_PREFIX = "worklist_v1_"

_TRIAGE_RANK = {3: "suspicious", 2: "indeterminate", 1: "not_suspicious"}
_STATE_RANK = {"running": 7, "waiting": 6, "receiving": 5, "failed": 4, "quarantined": 3, "done": 2, "not_analysed": 1}

# One statement derives the rows; {jobs}/{series}/{results}/{studies} are WHERE clauses: one study's (a
# trigger) or none (a rebuild). Triggers cannot hold a WITH clause, hence the subqueries in FROM.
_STATE = """CASE
            WHEN jp.job_state = 'running' THEN '{running}'
            WHEN jp.job_state = 'queued' THEN '{waiting}'
            WHEN COALESCE(sa.receiving, 0) > 0 OR jp.job_state = 'receiving' THEN '{receiving}'
            WHEN jp.job_state = 'failed' THEN '{failed}'
            WHEN jp.job_state = 'quarantined' OR (jp.job_id IS NULL AND sa.quarantined = sa.n_series) THEN '{quarantined}'
            WHEN jp.job_state = 'done' THEN '{done}'
            ELSE '{not_analysed}' END"""
_REFRESH = """INSERT OR REPLACE INTO worklist (study_uid, received_at, state, state_rank, job_id, job_state, stage,
        progress, pipeline, waiting_reason, error, series_reason, urgent, run_now, n_jobs, n_series, triage_rank,
        n_results, n_reviewed, reviewed_at)
    SELECT st.study_uid, st.received_at, {state}, {state_rank},
           jp.job_id, jp.job_state, jp.stage, jp.progress, jp.pipeline, jp.waiting_reason, jp.error, sa.series_reason,
           COALESCE(jp.urgent, 0), COALESCE(jp.run_now, 0), COALESCE(jp.n_jobs, 0), COALESCE(sa.n_series, 0),
           COALESCE(ra.triage_rank, 0), COALESCE(ra.n_results, 0), COALESCE(ra.n_reviewed, 0), ra.reviewed_at
    FROM studies st
    LEFT JOIN (SELECT j.study_uid,
                      MAX(CASE j.state WHEN 'running' THEN 7 WHEN 'queued' THEN 6 WHEN 'receiving' THEN 5
                          WHEN 'failed' THEN 4 WHEN 'quarantined' THEN 3 WHEN 'done' THEN 2 ELSE 1 END
                          * 10000000000 + j.id) AS pick,
                      j.id AS job_id, j.state AS job_state, j.stage, j.progress, j.pipeline, j.waiting_reason, j.error,
                      j.urgent, j.run_now, COUNT(*) AS n_jobs
               FROM jobs j {jobs} GROUP BY j.study_uid) jp ON jp.study_uid = st.study_uid
    LEFT JOIN (SELECT se.study_uid, COUNT(*) AS n_series, SUM(se.state IN ('receiving', 'complete')) AS receiving,
                      SUM(se.state = 'quarantined') AS quarantined, MAX(se.reason) AS series_reason
               FROM series se {series} GROUP BY se.study_uid) sa ON sa.study_uid = st.study_uid
    LEFT JOIN (SELECT r.study_uid, MAX(CASE r.triage WHEN 'suspicious' THEN 3 WHEN 'indeterminate' THEN 2
                                                     WHEN 'not_suspicious' THEN 1 ELSE 0 END) AS triage_rank,
                      COUNT(*) AS n_results, SUM(r.reviewed_at IS NOT NULL) AS n_reviewed,
                      MAX(r.reviewed_at) AS reviewed_at
               FROM results r {results} GROUP BY r.study_uid) ra ON ra.study_uid = st.study_uid
    {studies}"""


def _refresh(uid: str | None) -> str:
    """The refresh statement for one study (`uid` is a trigger's NEW./OLD. column) or for all (None)."""
    state = _STATE.format(**{s: s for s in STATES})
    rank = "CASE " + state + " " + " ".join(f"WHEN '{s}' THEN {r}" for s, r in _STATE_RANK.items()) + " END"
    where = {"jobs": "", "series": "", "results": "", "studies": ""} if uid is None else {
        "jobs": f"WHERE j.study_uid = {uid}", "series": f"WHERE se.study_uid = {uid}",
        "results": f"WHERE r.study_uid = {uid}", "studies": f"WHERE st.study_uid = {uid}"}
    return _REFRESH.format(state=state, state_rank=rank, **where)


_JOB_FIELDS = ("state", "stage", "progress", "waiting_reason", "error", "urgent", "run_now", "study_uid")


def _triggers() -> dict[str, str]:
    p = TRIGGER_PREFIX
    changed_job = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in _JOB_FIELDS)
    return {
        f"{p}study_ins": f"AFTER INSERT ON studies BEGIN {_refresh('NEW.study_uid')}; END",
        f"{p}study_del": "AFTER DELETE ON studies BEGIN DELETE FROM worklist WHERE study_uid = OLD.study_uid; END",
        f"{p}series_ins": f"AFTER INSERT ON series BEGIN {_refresh('NEW.study_uid')}; END",
        # a series row is updated by every received instance: only a change of state or reason matters
        f"{p}series_upd": (f"AFTER UPDATE OF state, reason ON series WHEN OLD.state IS NOT NEW.state "
                           f"OR OLD.reason IS NOT NEW.reason BEGIN {_refresh('NEW.study_uid')}; END"),
        f"{p}series_del": f"AFTER DELETE ON series BEGIN {_refresh('OLD.study_uid')}; END",
        f"{p}job_ins": f"AFTER INSERT ON jobs BEGIN {_refresh('NEW.study_uid')}; END",
        # a lease renewal changes none of these and costs only the WHEN test
        f"{p}job_upd": f"AFTER UPDATE ON jobs WHEN {changed_job} BEGIN {_refresh('NEW.study_uid')}; END",
        f"{p}job_del": f"AFTER DELETE ON jobs BEGIN {_refresh('OLD.study_uid')}; END",
        f"{p}result_ins": f"AFTER INSERT ON results BEGIN {_refresh('NEW.study_uid')}; END",
        f"{p}result_upd": (f"AFTER UPDATE OF triage, reviewed_at ON results BEGIN "
                           f"{_refresh('NEW.study_uid')}; END"),
        f"{p}result_del": f"AFTER DELETE ON results BEGIN {_refresh('OLD.study_uid')}; END",
    }


_ensured: set[tuple[str, int]] = set()


def ensure_worklist(store: Store, *, force: bool = False) -> bool:
    """Install the triggers if any is missing and rebuild the table with them, atomically. True if it did."""
    triggers = _triggers()
    conn = store.connect()
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
               if r[0].startswith(TRIGGER_PREFIX)}
    if present == set(triggers) and not force:
        return False
    with store.transaction() as tx:
        for (name,) in tx.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'worklist%'"):
            tx.execute(f'DROP TRIGGER IF EXISTS "{name}"')
        for name, body in triggers.items():
            tx.execute(f'CREATE TRIGGER "{name}" {body}')
        tx.execute("DELETE FROM worklist")
        tx.execute(_refresh(None))
    return True


def _ensure_once(store: Store) -> None:
    """Per process and database: checked on first use (a cheap sqlite_master read afterwards is skipped)."""
    key = (str(store.db_path), id(store))
    if key not in _ensured:
        ensure_worklist(store)
        _ensured.add(key)


@dataclass
class WorklistQuery:
    state: str | None = None
    triage: str | None = None
    modality: str | None = None
    reviewed: bool | None = None
    date_from: float | None = None  # received_at bounds, epoch seconds
    date_to: float | None = None
    search: str | None = None
    sort: str = "received"
    descending: bool = True
    page: int = 1
    per_page: int = 50


@dataclass
class WorklistPage:
    rows: list[dict]
    total: int
    page: int
    per_page: int
    counts: dict[str, int] = field(default_factory=dict)  # per state over the whole store (the filter chips)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


_WORKLIST_COLUMNS = """w.state, w.job_id, w.job_state, w.stage, w.progress, w.pipeline, w.waiting_reason, w.error,
       w.series_reason, w.urgent, w.run_now, w.n_jobs, w.n_series, w.triage_rank, w.n_results, w.n_reviewed,
       w.reviewed_at"""
_FROM = "FROM worklist w JOIN studies st ON st.study_uid = w.study_uid"
_SELECT = f"""SELECT st.study_uid, st.patient_id, st.patient_name, st.study_date, st.accession, st.description,
       st.modalities, st.received_at, st.updated_at, {_WORKLIST_COLUMNS}
{_FROM}"""


def _where(q: WorklistQuery) -> tuple[list[str], dict]:
    """The filters as SQL clauses on `w` (worklist) and `st` (studies); `{r}` is whichever of the two drives
    the query (received_at and study_uid are in both)."""
    clauses, params = [], {}
    if q.state:
        clauses.append("w.state = :state")
        params["state"] = q.state
    if q.triage:
        clauses.append("w.triage_rank = :trank")
        params["trank"] = {v: k for k, v in _TRIAGE_RANK.items()}.get(q.triage, 0)
    if q.modality:
        clauses.append("(',' || COALESCE(st.modalities, '') || ',') LIKE :modality")
        params["modality"] = f"%,{q.modality.upper()},%"
    if q.reviewed is not None:
        clauses.append("(w.n_results > 0 AND w.n_reviewed = w.n_results)" if q.reviewed
                       else "(w.n_results > 0 AND w.n_reviewed < w.n_results)")
    if q.date_from is not None:
        clauses.append("{r}.received_at >= :dfrom")
        params["dfrom"] = q.date_from
    if q.date_to is not None:
        clauses.append("{r}.received_at < :dto")
        params["dto"] = q.date_to
    if q.search and q.search.strip():
        text = q.search.strip()
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        clauses.append("(st.patient_name LIKE :q ESCAPE '\\' OR st.patient_id LIKE :q ESCAPE '\\' "
                       "OR st.accession LIKE :q ESCAPE '\\' OR st.description LIKE :q ESCAPE '\\' "
                       "OR st.study_uid = :exact)")
        params["q"] = like
        params["exact"] = text
    return clauses, params


def _order(q: WorklistQuery, r: str = "w") -> str:
    direction = "DESC" if q.descending else "ASC"
    column = SORTS.get(q.sort, SORTS["received"]).replace("w.received_at", f"{r}.received_at")
    tail = "" if column == f"{r}.received_at" else f", {r}.received_at DESC"
    return f" ORDER BY {column} {direction}{tail}, {r}.study_uid"


def _source(clauses: list[str], sort: str) -> tuple[str, str]:
    """(FROM clause, driving alias): only the table(s) the filters and the sort need. A search sorted by name
    reads `studies` alone (a 10,000-row scan without 10,000 joins); a state filter reads `worklist` alone."""
    text = " ".join(clauses) + " " + SORTS.get(sort, SORTS["received"])
    needs_w, needs_st = "w." in text, "st." in text
    if needs_st and not needs_w:
        return " FROM studies st", "st"
    if needs_st:
        return " FROM worklist w JOIN studies st ON st.study_uid = w.study_uid", "w"
    return " FROM worklist w", "w"


def query_worklist(store: Store, q: WorklistQuery) -> WorklistPage:
    """One page: the rows, their total, the per-state counts and the page's image counts (4 indexed queries)."""
    _ensure_once(store)
    per_page = max(1, min(int(q.per_page), MAX_PER_PAGE))
    page = max(1, int(q.page))
    clauses, params = _where(q)
    source, r = _source(clauses, q.sort)
    where = (" WHERE " + " AND ".join(clauses)).replace("{r}", r) if clauses else ""
    conn = store.connect()
    conn.execute("BEGIN")  # one snapshot: rows, total and counts agree with each other
    try:
        # the page's keys first, from the driving table alone when it can (an index walk or one scan), then
        # the page's 50 rows joined in full
        rows = conn.execute(f"{_SELECT} WHERE w.study_uid IN (SELECT {r}.study_uid{source}{where}{_order(q, r)} "
                            f"LIMIT :limit OFFSET :offset){_order(q)}",
                            {**params, "limit": per_page, "offset": (page - 1) * per_page}).fetchall()
        total = conn.execute(f"SELECT COUNT(*){source}{where}", params).fetchone()[0]
        counts = {s: 0 for s in STATES}
        for r in conn.execute("SELECT state, COUNT(*) AS n FROM worklist GROUP BY state"):
            counts[r["state"]] = r["n"]
        out = [_row(r) for r in rows]
        _attach_image_counts(conn, out)
    finally:
        conn.execute("COMMIT")
    return WorklistPage(out, int(total), page, per_page, counts)


def _row(r) -> dict:
    d = dict(r)
    d["triage"] = _TRIAGE_RANK.get(d.pop("triage_rank"))
    d["reviewed"] = d["n_results"] > 0 and d["n_reviewed"] == d["n_results"]
    d["urgent"] = bool(d["urgent"])
    d["run_now"] = bool(d["run_now"])
    d["reason"] = {"waiting": d["waiting_reason"], "failed": d["error"],
                   "quarantined": d["error"] or d["series_reason"], "not_analysed": d["series_reason"]}.get(d["state"])
    return d


def _attach_image_counts(conn, rows: list[dict]) -> None:
    """Images per study for the page's rows only: one grouped query on the instances index."""
    if not rows:
        return
    uids = [r["study_uid"] for r in rows]
    marks = ",".join("?" * len(uids))
    counts = {r[0]: r[1] for r in conn.execute(
        f"SELECT se.study_uid, COUNT(*) FROM series se JOIN instances i ON i.series_uid = se.series_uid "
        f"WHERE se.study_uid IN ({marks}) GROUP BY se.study_uid", uids)}
    for r in rows:
        r["images"] = counts.get(r["study_uid"], 0)


def study_summary(store: Store, study_uid: str) -> dict | None:
    """The worklist row of one study (the study page's header), the same derivation as the list."""
    _ensure_once(store)
    row = store.query_one(f"{_SELECT} WHERE w.study_uid = ?", (study_uid,))
    if row is None:
        return None
    out = [_row(row)]
    _attach_image_counts(store.connect(), out)
    return out[0]


def list_studies(store: Store, limit: int | None = None) -> list[dict]:
    """Studies newest first, each its worklist row (state, reason, triage, reviewed) plus its `series`: the
    series' columns, `instances`, and the series' job (`job_id`, `job_state`, `waiting_reason`, `job_error`,
    `job_stage`, `job_progress`, `triage`); for the MG series of a mammography exam, the exam's one job.

    For `edgescreen studies` (a technician's listing, all at once): a fixed number of queries per 500
    studies, never one per study or per series.
    """
    _ensure_once(store)
    sql = (f"SELECT st.*, {_WORKLIST_COLUMNS} {_FROM} ORDER BY w.received_at DESC, w.study_uid"
           + (" LIMIT ?" if limit else ""))
    studies = [_row(r) for r in store.query(sql, (int(limit),) if limit else ())]
    by_uid = {st["study_uid"]: {**st, "series": []} for st in studies}
    uids = list(by_uid)
    for chunk in range(0, len(uids), 500):
        part = uids[chunk:chunk + 500]
        marks = ", ".join("?" * len(part))
        counts = {r[0]: r[1] for r in store.query(
            f"SELECT i.series_uid, COUNT(*) FROM series se JOIN instances i ON i.series_uid = se.series_uid "
            f"WHERE se.study_uid IN ({marks}) GROUP BY i.series_uid", tuple(part))}
        jobs = store.query(f"SELECT j.id, j.study_uid, j.series_uid, j.pipeline, j.state, j.waiting_reason, j.error, "
                           f"j.stage, j.progress, r.triage FROM jobs j LEFT JOIN results r ON r.job_id = j.id "
                           f"WHERE j.study_uid IN ({marks}) ORDER BY j.id", tuple(part))
        latest_by_series = {j["series_uid"]: j for j in jobs}  # ascending ids: the last one wins
        mammo_by_study = {j["study_uid"]: j for j in jobs if j["pipeline"] == "mammo"}
        for se in store.query(f"SELECT * FROM series WHERE study_uid IN ({marks}) "
                              f"ORDER BY number, first_received_at", tuple(part)):
            row = dict(se)
            job = latest_by_series.get(row["series_uid"]) or (
                mammo_by_study.get(row["study_uid"]) if row["pipeline"] == "mammo" else None)
            row["instances"] = counts.get(row["series_uid"], 0)
            row.update({"job_id": None, "job_state": None, "waiting_reason": None, "job_error": None,
                        "job_stage": None, "job_progress": None, "triage": None} if job is None else {
                "job_id": job["id"], "job_state": job["state"], "waiting_reason": job["waiting_reason"],
                "job_error": job["error"], "job_stage": job["stage"], "job_progress": job["progress"],
                "triage": job["triage"]})
            by_uid[row["study_uid"]]["series"].append(row)
    return [by_uid[uid] for uid in uids]


def day_bounds(date_text: str) -> tuple[float, float]:
    """Local-midnight bounds of a YYYY-MM-DD day, for the received-date filter."""
    t = time.strptime(date_text, "%Y-%m-%d")
    start = time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))
    end = time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 0, 0, 0, -1))
    return start, end
