"""The worker: takes jobs from the durable queue under a lease and runs them only while the gate is open.

Before every stage and every tile batch (the pipeline's safe points) it asks the gate again and
renews its lease. When the gate closes it lets the pipeline checkpoint and gives the job back, so no
inference runs past one tile batch after the scanner turns busy. A killed worker's lease expires and
the job resumes from its checkpoint in the next worker; the result and `done` are one transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from edgescreen.appliance.context import AppContext
from edgescreen.appliance.logs import get_logger
from edgescreen.appliance.scheduler import retry
from edgescreen.appliance.scheduler.live import LiveGate
from edgescreen.appliance.store import jobs
from edgescreen.appliance.store.instances import job_files
from edgescreen.appliance.store.retention import IdlePurger

log = get_logger(__name__)

POLL_S = 2.0
# CPU priority the worker takes for itself (Linux nice, per thread: the threads and inference pools it starts
# inherit it). Inference can wait a moment; the staff's pages and the DICOM listener on the same 2 cores cannot:
# bench/bench_web.py measures what this buys the UI's p95 while a CT is analysed. The sync service is at 10 too.
WORKER_NICE = 10


def lower_priority(nice: int) -> int | None:
    """Raise niceness to `nice` (never lower it: a unit's Nice= above it stays) and return it.

    Linux keeps niceness per thread and new threads inherit their creator's. Run as the worker process (main
    thread), every thread already started (a math library's pool) is lowered too; run in a thread of another
    program (the self-test), only that thread and those it starts."""
    tids = [0]
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(OSError):
            tids = [int(t) for t in os.listdir("/proc/self/task")]
    try:
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, 0)
    except OSError as exc:  # a sandbox without the syscall: run at the priority we were given
        log.warning("worker priority not lowered", error=str(exc))
        return None


class LeaseLost(RuntimeError):
    """Another worker reclaimed our job (we stalled past the lease); stop without writing anything."""


# what run_job returns, and whether the loop goes straight on to the next job (the queue moved) or sleeps
PROGRESS_OUTCOMES = frozenset({"done", "failed", "quarantined"})
PROGRESS_EVERY_S = 1.0  # the progress column is written at most this often (and at each new stage)
MAX_IDLE_BACKOFF_S = 60.0  # the longest the loop sleeps after the store itself failed


class Worker:
    def __init__(self, ctx: AppContext, *, poll_s: float = POLL_S, once: bool = False) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # pids repeat across restarts
        self.lease_s = ctx.config.scheduler.lease_s
        self.poll_s = poll_s
        self.once = once
        self.stop = threading.Event()
        self.alive_at = time.monotonic()  # stamped each loop turn and safe point: the systemd watchdog's health check
        self.retention = IdlePurger(self.store, ctx.config.retention)  # issue 13: deletes by policy when idle
        self.gate = LiveGate(ctx)
        self.power_mode = PowerModeSwitch(self.store)
        self.retry_policies = retry.policies(ctx.config.scheduler.retry)
        self._traced: set[tuple[int, str]] = set()  # (job, error class) whose stack trace is already logged
        hw = ctx.config.hardware
        self.bundle_dir = Path(hw.bundle) if hw.bundle else None
        self.models_dir = Path(hw.models_dir) if hw.models_dir else None

    # -- the loop ---------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Step until stopped. After a step that moved nothing (gate closed, queue empty, a job deferred or
        preempted) it sleeps: the poll interval, or until the next deferred job is due if that is sooner;
        after the store itself failed (a locked or full database) it backs off up to a minute."""
        log.info("worker started", owner=self.owner, nice=lower_priority(WORKER_NICE))
        failures = 0
        while not self.stop.is_set():
            self.alive_at = time.monotonic()
            try:
                outcome = self.step()
                failures = 0
            except (sqlite3.Error, OSError) as exc:
                failures += 1
                wait = min(MAX_IDLE_BACKOFF_S, self.poll_s * 2 ** min(failures, 10))
                (log.exception if failures == 1 else log.warning)(
                    "worker step failed on the store; backing off", error=f"{type(exc).__name__}: {exc}",
                    failures=failures, wait_s=round(wait, 1))
                self.stop.wait(wait)
                continue
            if outcome in PROGRESS_OUTCOMES:
                continue
            if self.once and not self._outstanding():
                break
            self.retention.maybe_run()
            self.stop.wait(self._idle_wait())
        log.info("worker stopped", owner=self.owner)

    def _idle_wait(self) -> float:
        due = jobs.queue_summary(self.store)["next_due"]
        if due is None:
            return self.poll_s
        return max(0.05, min(self.poll_s, due - time.time()))

    def _outstanding(self) -> int:
        """Jobs still to finish: queued ones (deferred ones too), and running ones whose worker may have died
        (its lease then expires and `reclaim_expired` queues the job again), so `--once` never leaves a killed
        worker's job."""
        summary = jobs.queue_summary(self.store)
        return summary["queued"] + summary["running"]

    def step(self) -> str | None:
        """One scheduling decision: None when no job ran, else the job's outcome (see run_job)."""
        jobs.reclaim_expired(self.store, max_crashes=self.ctx.config.scheduler.max_crashes)
        summary = jobs.queue_summary(self.store)
        if not summary["queued"]:
            return None
        oldest = summary["oldest_created_at"]
        decision, only_run_now, starving = self.gate.plan(
            oldest_queued_age_s=time.time() - oldest if oldest else 0.0, run_now_waiting=summary["run_now_waiting"])
        if not decision.run:
            jobs.set_waiting_reason(self.store, decision.reason)
            return None
        job = jobs.claim_next(self.store, self.owner, self.lease_s, starvation_s=self.ctx.config.scheduler.starvation_s,
                              only_run_now=only_run_now)
        if job is None:
            return None
        self.power_mode.apply(decision.mode)
        return self.run_job(job, threads=decision.mode.threads, starving=starving)

    # -- one job ----------------------------------------------------------------------------------
    def job_dirs(self, job_id: int) -> tuple[Path, Path]:
        return self.store.results_dir / f"job-{job_id}", self.store.work_dir / f"job-{job_id}" / "checkpoint"

    def run_job(self, job: dict, *, threads: int | None = None, starving: bool = False) -> str:
        """Run one claimed job to one of: done, failed, quarantined, preempted, deferred, lease-lost.

        Every exit gives the job back through the guarded transitions; nothing escapes but a store that
        cannot be written at all (the loop backs off, the lease expires, the job is reclaimed).
        """
        from edgescreen.appliance.pipeline.analyze import InputError
        from edgescreen.appliance.pipeline.checkpoint import Preempted
        from edgescreen.appliance.pipeline.ctload import SeriesError

        job_id = job["id"]
        jlog = log.bind(job=job_id, study=job["study_uid"], series=job["series_uid"])
        self._preempt_reason = None
        try:
            return self._run(job, jlog, threads=threads, starving=starving)
        except Preempted as exc:
            reason = self._preempt_reason or "waiting: gate closed"
            jobs.release(self.store, job_id, self.owner, to="queued", reason=reason)
            self.store.add_event("job", "worker", "preempted", json.dumps({"job": job_id, "at": exc.safe_point,
                                                                          "reason": reason}))
            jlog.info("job preempted", safe_point=exc.safe_point, reason=reason)
            return "preempted"
        except LeaseLost as exc:
            jlog.warning("job abandoned", reason=str(exc))
            return "lease-lost"
        except (SeriesError, InputError) as exc:
            jobs.release(self.store, job_id, self.owner, to="quarantined", error=str(exc))
            self.store.add_event("job", "worker", "quarantined", json.dumps({"job": job_id, "reason": str(exc)}))
            jlog.warning("job quarantined", reason=str(exc))
            return "quarantined"
        except Exception as exc:  # a system error is retried (bounded); a bug or a broken model fails this job
            error_class = retry.classify(exc)
            if error_class is not None:
                return self._defer(job_id, jlog, exc, error_class)
            jlog.exception("job failed")
            jobs.release(self.store, job_id, self.owner, to="failed", error=f"{type(exc).__name__}: {exc}")
            self.store.add_event("job", "worker", "failed", json.dumps({"job": job_id, "error": str(exc)}))
            return "failed"

    def _defer(self, job_id: int, jlog, exc: BaseException, error_class: str) -> str:
        """Bounded retry after a system error: backoff with jitter; the stack trace is logged once per class."""
        policy = self.retry_policies[error_class]
        counts = json.loads((jobs.get(self.store, job_id) or {}).get("retry_counts") or "{}")
        attempt = counts.get(error_class, 0) + 1
        wait = retry.delay(policy, attempt)
        message = retry.describe(exc, error_class)
        if (job_id, error_class) not in self._traced:
            self._traced.add((job_id, error_class))
            jlog.exception("job interrupted by a system error; it will be retried", error_class=error_class)
        outcome, n = jobs.defer(self.store, job_id, self.owner, error_class=error_class, error=message,
                                max_retries=policy.retries, delay_s=wait)
        if outcome == "failed":
            jlog.error("job failed after its retries", error_class=error_class, retries=policy.retries, error=message)
            self.store.add_event("job", "worker", "failed", json.dumps({"job": job_id, "error": message}))
            return "failed"
        if outcome == "deferred":
            jlog.warning("job deferred after a system error", error_class=error_class, retry=n,
                         of=policy.retries, wait_s=round(wait, 1), error=message)
            self.store.add_event("job", "worker", "deferred", json.dumps({"job": job_id, "error_class": error_class,
                                                                         "retry": n, "wait_s": round(wait, 3)}))
            return "deferred"
        return "lease-lost"

    def _run(self, job: dict, jlog, *, threads: int | None, starving: bool) -> str:
        from edgescreen.appliance.pipeline.analyze import AnalysisRequest, AnalysisSettings, analyze_study
        from edgescreen.appliance.sync.enqueue import outbox_items_for_result

        job_id = job["id"]
        out_dir, ckpt_dir = self.job_dirs(job_id)
        # outputs go to a private directory and are moved into place only by the lease holder
        attempt_dir = self.store.work_dir / f"job-{job_id}" / f"out-{self.owner.replace(':', '-')}"
        shutil.rmtree(attempt_dir, ignore_errors=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        resumed = any(ckpt_dir.iterdir())
        self.store.add_event("job", "worker", "resumed" if resumed else "started",
                             json.dumps({"job": job_id, "owner": self.owner}))
        jlog.info("job running", resumed=resumed, crashes=job["attempts"])
        run_now = bool(job["run_now"])
        lease = _LeaseKeeper(self.store, job_id, self.owner, self.lease_s)
        progress = _ProgressReporter(self.store, job_id, self.owner)

        def gate(safe_point: str) -> bool:
            self.alive_at = time.monotonic()
            if self.stop.is_set():
                self._preempt_reason = "waiting: worker was stopped; resumes from its checkpoint"
                return False
            if lease.lost.is_set() or not jobs.renew_lease(self.store, job_id, self.owner, self.lease_s):
                raise LeaseLost(f"job {job_id}: lease lost at {safe_point}")
            obs = self.gate.observe(run_now=run_now, starving=starving)
            if not obs.decision.run:
                self._preempt_reason = obs.decision.reason
            return obs.decision.run

        with lease:
            findings = analyze_study(AnalysisRequest(
                job_files(self.store, job), attempt_dir, models_dir=self.models_dir, bundle_dir=self._bundle(),
                trusted_keys=self.ctx.key_home, settings=AnalysisSettings.from_triage(self.ctx.config.triage, threads=threads),
                progress=progress, gate=gate, checkpoint_dir=ckpt_dir))
        if lease.lost.is_set() or not jobs.renew_lease(self.store, job_id, self.owner, self.lease_s):
            jlog.warning("job finished but lease was lost; result discarded (the new owner writes it)")
            return "lease-lost"
        progress("outputs", 1.0)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(attempt_dir, out_dir)
        items = outbox_items_for_result(self.ctx.config, data_dir=self.ctx.data_dir, study_uid=job["study_uid"],
                                        findings=findings, out_dir=out_dir)
        if not jobs.finish(self.store, job_id, self.owner, triage=findings["triage"], findings_json=json.dumps(findings),
                           output_dir=str(out_dir), outbox_items=items):
            jlog.warning("job finished but lease was lost; result discarded (the new owner writes it)")
            return "lease-lost"
        shutil.rmtree(ckpt_dir.parent, ignore_errors=True)
        self.store.add_event("job", "worker", "done", json.dumps({"job": job_id, "triage": findings["triage"]}))
        for model in findings.get("models", []):  # a bundle backend that failed to load: the system page shows it
            if model.get("refused"):
                self.store.add_event("backend", model["role"], "fallback", json.dumps(
                    {"job": job_id, "running": f"{model['backend']}/{model['device']}/{model['precision']}",
                     "refused": model["refused"]}))
        jlog.info("job done", triage=findings["triage"], outbox=len(items))
        return "done"

    def _bundle(self) -> Path | None:
        """The configured bundle, else the one `edgescreen bundle install` made current (read per job, so an
        install or a rollback takes effect at the next job without a restart)."""
        if self.bundle_dir is not None:
            return self.bundle_dir
        from edgescreen.appliance.bundle import current_bundle

        return current_bundle(self.ctx.data_dir)

    def install_signal_handlers(self) -> None:
        def _stop(signum, frame) -> None:  # noqa: ARG001
            log.info("worker stopping", signal=signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
class _LeaseKeeper:
    """Renews the lease from a thread while a job runs, so one long stage or a slow model load never
    lets another worker reclaim a job that is still computing."""

    def __init__(self, store, job_id: int, owner: str, lease_s: float) -> None:
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not jobs.renew_lease(self.store, self.job_id, self.owner, self.lease_s):
                    self.lost.set()
                    return
            except sqlite3.Error as exc:  # a busy database: the next beat tries again
                log.warning("lease renewal failed", job=self.job_id, error=str(exc))

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


class _ProgressReporter:
    """The pipeline's progress callback: the job's stage and how far through it, written at most once a
    second (and at every new stage), so a tile loop calling it hundreds of times costs no write each."""

    def __init__(self, store, job_id: int, owner: str, every_s: float = PROGRESS_EVERY_S) -> None:
        self.store, self.job_id, self.owner, self.every_s = store, job_id, owner, every_s
        self._stage: str | None = None
        self._written = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage == self._stage and now - self._written < self.every_s and fraction < 1.0:
            return
        self._stage, self._written = stage, now
        try:
            jobs.report_progress(self.store, self.job_id, self.owner, stage, fraction)
        except sqlite3.Error as exc:  # progress is for the eyes only; the next report tries again
            log.warning("progress not recorded", job=self.job_id, error=str(exc))


class PowerModeSwitch:
    """Applies the profile's power mode where the box has a knob for it: `nvpmodel -m N` on a Jetson.

    Threads are passed to each job; the nvpmodel mode is a board-wide setting, changed only when the
    chosen mode changes, and recorded as a power event. A box without nvpmodel keeps its clocks.
    """

    def __init__(self, store, nvpmodel: str | None = None) -> None:
        self.store = store
        self.nvpmodel = nvpmodel or shutil.which("nvpmodel")
        self.current: int | None = None

    def apply(self, mode) -> None:
        if mode.nvpmodel is None or self.nvpmodel is None or mode.nvpmodel == self.current:
            return
        import subprocess

        proc = subprocess.run([self.nvpmodel, "-m", str(mode.nvpmodel)], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            log.warning("nvpmodel failed; running in the current board mode", mode=mode.name,
                        error=(proc.stderr or proc.stdout).strip()[:200])
            return
        self.current = mode.nvpmodel
        self.store.add_event("power", "nvpmodel", mode.name, f"nvpmodel -m {mode.nvpmodel}")
        log.info("power mode set", mode=mode.name, nvpmodel=mode.nvpmodel)
