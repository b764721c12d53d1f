"""The worker: takes jobs from the durable queue under a lease and runs them only while the gate is open.

Before every stage and every tile batch (the pipeline's safe points) it asks the gate again and
renews its lease. When the gate closes it lets the pipeline checkpoint and gives the job back, so no
inference runs past one tile batch after the scanner turns busy. A killed worker's lease expires and
the job resumes from its checkpoint in the next worker; the result and `done` are one transaction.
"""

from __future__ import annotations

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

from appliance.context import AppContext
from appliance.logs import get_logger
from appliance.scheduler.live import LiveGate
from appliance.store import jobs
from appliance.store.instances import job_files

log = get_logger(__name__)

POLL_S = 2.0


class LeaseLost(RuntimeError):
    """Another worker reclaimed our job (we stalled past the lease); stop without writing anything."""


class Worker:
    def __init__(self, ctx: AppContext, *, poll_s: float = POLL_S, once: bool = False) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # pids repeat across restarts
        self.lease_s = ctx.config.scheduler.lease_s
        self.poll_s = poll_s
        self.once = once
        self.stop = threading.Event()
        self.gate = LiveGate(ctx)
        self.power_mode = PowerModeSwitch(self.store)
        hw = ctx.config.hardware
        self.bundle_dir = Path(hw.bundle) if hw.bundle else None
        self.models_dir = Path(hw.models_dir) if hw.models_dir else None

    # -- the loop ---------------------------------------------------------------------------------
    def run_forever(self) -> None:
        log.info("worker started", owner=self.owner)
        while not self.stop.is_set():
            worked = self.step()
            if self.once and not worked and not self._outstanding():
                break
            if not worked:
                self.stop.wait(self.poll_s)
        log.info("worker stopped", owner=self.owner)

    def _outstanding(self) -> int:
        """Jobs still to finish: queued ones, and running ones whose worker may have died (its lease then
        expires and `reclaim_expired` queues the job again), so `--once` never leaves a killed worker's job."""
        return self.store.query_one("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')")[0]

    def step(self) -> bool:
        """One scheduling decision; True when a job ran (to completion or to a preemption)."""
        from appliance.scheduler.policy import plan

        jobs.reclaim_expired(self.store, max_crashes=self.ctx.config.scheduler.max_crashes)
        now, scanner, power = self.gate.read()
        decision, only_run_now, starving = plan(
            self.gate.gate, now, scanner, power, oldest_queued_age_s=self._oldest_queued_age(),
            starvation_s=self.ctx.config.scheduler.starvation_s, run_now_waiting=self._has_run_now())
        if not decision.run:
            jobs.set_waiting_reason(self.store, decision.reason)
            return False
        job = jobs.claim_next(self.store, self.owner, self.lease_s, starvation_s=self.ctx.config.scheduler.starvation_s,
                              only_run_now=only_run_now)
        if job is None:
            return False
        self.power_mode.apply(decision.mode)
        self.run_job(job, threads=decision.mode.threads, starving=starving)
        return True

    def _oldest_queued_age(self) -> float:
        row = self.store.query_one("SELECT MIN(created_at) FROM jobs WHERE state = 'queued'")
        return time.time() - row[0] if row and row[0] else 0.0

    def _has_run_now(self) -> bool:
        return self.store.query_one("SELECT 1 FROM jobs WHERE state = 'queued' AND run_now = 1") is not None

    # -- one job ----------------------------------------------------------------------------------
    def job_dirs(self, job_id: int) -> tuple[Path, Path]:
        return self.store.results_dir / f"job-{job_id}", self.store.work_dir / f"job-{job_id}" / "checkpoint"

    def run_job(self, job: dict, *, threads: int | None = None, starving: bool = False) -> str:
        from appliance.pipeline.analyze import InputError, analyze_study
        from appliance.pipeline.checkpoint import Preempted
        from appliance.pipeline.ctload import SeriesError

        job_id = job["id"]
        jlog = log.bind(job=job_id, study=job["study_uid"], series=job["series_uid"])
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
        self._preempt_reason = None
        lease = _LeaseKeeper(self.store, job_id, self.owner, self.lease_s)

        def gate(safe_point: str) -> bool:
            if self.stop.is_set():
                self._preempt_reason = "waiting: worker was stopped; resumes from its checkpoint"
                return False
            if lease.lost.is_set() or not jobs.renew_lease(self.store, job_id, self.owner, self.lease_s, stage=safe_point):
                raise LeaseLost(f"job {job_id}: lease lost at {safe_point}")
            obs = self.gate.observe(run_now=run_now, starving=starving)
            if not obs.decision.run:
                self._preempt_reason = obs.decision.reason
            return obs.decision.run

        try:
            with lease:
                findings = analyze_study(job_files(self.store, job), attempt_dir, checkpoint_dir=ckpt_dir, gate=gate,
                                         threads=threads, threshold=self._threshold(job["pipeline"]),
                                         bundle_dir=self._bundle(), models_dir=self.models_dir,
                                         trusted_keys=self.ctx.data_dir)
        except Preempted as exc:
            reason = self._preempt_reason or "waiting: gate closed"
            jobs.release(self.store, job_id, self.owner, to="queued", reason=reason, stage=exc.safe_point)
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
        except (sqlite3.OperationalError, OSError) as exc:  # a locked database, a full disk: try again later
            jlog.exception("job interrupted by a system error; it stays queued")
            jobs.release(self.store, job_id, self.owner, to="queued", reason=f"waiting: retry after {exc}")
            return "retry"
        except Exception as exc:  # a bug or a broken model must fail this job, never the worker
            jlog.exception("job failed")
            jobs.release(self.store, job_id, self.owner, to="failed", error=f"{type(exc).__name__}: {exc}")
            self.store.add_event("job", "worker", "failed", json.dumps({"job": job_id, "error": str(exc)}))
            return "failed"
        if lease.lost.is_set() or not jobs.renew_lease(self.store, job_id, self.owner, self.lease_s, stage="outputs"):
            jlog.warning("job finished but lease was lost; result discarded (the new owner writes it)")
            return "lease-lost"
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(attempt_dir, out_dir)
        findings_json = json.dumps(findings)
        if not jobs.finish(self.store, job_id, self.owner, triage=findings["triage"], findings_json=findings_json,
                           output_dir=str(out_dir)):
            jlog.warning("job finished but lease was lost; result discarded (the new owner writes it)")
            return "lease-lost"
        shutil.rmtree(ckpt_dir.parent, ignore_errors=True)
        self.store.add_event("job", "worker", "done", json.dumps({"job": job_id, "triage": findings["triage"]}))
        jlog.info("job done", triage=findings["triage"])
        return "done"

    def _bundle(self) -> Path | None:
        """The configured bundle, else the one `edgescreen bundle install` made current (read per job, so an
        install or a rollback takes effect at the next job without a restart)."""
        if self.bundle_dir is not None:
            return self.bundle_dir
        from appliance.bundle import current_bundle

        return current_bundle(self.ctx.data_dir)

    def _threshold(self, pipeline: str) -> float | None:
        triage = self.ctx.config.triage
        return triage.pancreas_threshold if pipeline == "pancreas" else triage.mammo_threshold

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
