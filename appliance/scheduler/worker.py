"""The worker: takes jobs from the durable queue under a lease and runs them only while the gate is open.

Before every stage and every tile batch (the pipeline's safe points) it asks the gate again and
renews its lease. When the gate closes it lets the pipeline checkpoint and gives the job back, so no
inference runs past one tile batch after the scanner turns busy. A killed worker's lease expires and
the job resumes from its checkpoint in the next worker; the result and `done` are one transaction.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from appliance.context import AppContext
from appliance.logs import get_logger
from appliance.scheduler.live import LiveGate
from appliance.store import jobs
from appliance.store.instances import series_files

log = get_logger(__name__)

POLL_S = 2.0


class LeaseLost(RuntimeError):
    """Another worker reclaimed our job (we stalled past the lease); stop without writing anything."""


class Worker:
    def __init__(self, ctx: AppContext, *, poll_s: float = POLL_S, once: bool = False) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = ctx.config.scheduler.lease_s
        self.poll_s = poll_s
        self.once = once
        self.stop = threading.Event()
        self.gate = LiveGate(ctx)
        self.bundle_dir = Path(ctx.config.hardware.bundle) if ctx.config.hardware.bundle else None

    # -- the loop ---------------------------------------------------------------------------------
    def run_forever(self) -> None:
        log.info("worker started", owner=self.owner)
        while not self.stop.is_set():
            worked = self.step()
            if self.once and not worked and not self._queued():
                break
            if not worked:
                self.stop.wait(self.poll_s)
        log.info("worker stopped", owner=self.owner)

    def _queued(self) -> int:
        return self.store.query_one("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")[0]

    def step(self) -> bool:
        """One scheduling decision; True when a job ran (to completion or to a preemption)."""
        jobs.reclaim_expired(self.store)
        starving = self._oldest_queued_age() > self.ctx.config.scheduler.starvation_s
        obs = self.gate.observe(starving=starving)
        only_run_now = False
        if not obs.decision.run and self._has_run_now():
            obs = self.gate.observe(run_now=True)
            only_run_now = obs.decision.run
        if not obs.decision.run:
            jobs.set_waiting_reason(self.store, obs.decision.reason)
            return False
        job = jobs.claim_next(self.store, self.owner, self.lease_s, starvation_s=self.ctx.config.scheduler.starvation_s,
                              only_run_now=only_run_now)
        if job is None:
            return False
        self.run_job(job, threads=obs.decision.mode.threads)
        return True

    def _oldest_queued_age(self) -> float:
        row = self.store.query_one("SELECT MIN(created_at) FROM jobs WHERE state = 'queued'")
        return time.time() - row[0] if row and row[0] else 0.0

    def _has_run_now(self) -> bool:
        return self.store.query_one("SELECT 1 FROM jobs WHERE state = 'queued' AND run_now = 1") is not None

    # -- one job ----------------------------------------------------------------------------------
    def job_dirs(self, job_id: int) -> tuple[Path, Path]:
        return self.store.results_dir / f"job-{job_id}", self.store.work_dir / f"job-{job_id}" / "checkpoint"

    def run_job(self, job: dict, *, threads: int | None = None) -> str:
        from appliance.pipeline.analyze import InputError, analyze_study
        from appliance.pipeline.checkpoint import Preempted
        from appliance.pipeline.ctload import SeriesError

        job_id = job["id"]
        jlog = log.bind(job=job_id, study=job["study_uid"], series=job["series_uid"])
        out_dir, ckpt_dir = self.job_dirs(job_id)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        resumed = any(ckpt_dir.iterdir())
        self.store.add_event("job", "worker", "resumed" if resumed else "started",
                             json.dumps({"job": job_id, "owner": self.owner}))
        jlog.info("job running", resumed=resumed, attempt=job["attempts"])
        run_now = bool(job["run_now"])

        def gate(safe_point: str) -> bool:
            if self.stop.is_set():
                self._preempt_reason = "waiting: worker was stopped; resumes from its checkpoint"
                return False
            if not jobs.renew_lease(self.store, job_id, self.owner, self.lease_s, stage=safe_point):
                raise LeaseLost(f"job {job_id}: lease lost at {safe_point}")
            obs = self.gate.observe(run_now=run_now)
            if not obs.decision.run:
                self._preempt_reason = obs.decision.reason
            return obs.decision.run

        self._preempt_reason = None
        paths = series_files(self.store, job["series_uid"])
        try:
            findings = analyze_study(paths, out_dir, checkpoint_dir=ckpt_dir, gate=gate, threads=threads,
                                     threshold=self._threshold(job["pipeline"]), bundle_dir=self.bundle_dir)
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
        except Exception as exc:  # a bug or a broken model must fail this job, never the worker
            jlog.exception("job failed")
            jobs.release(self.store, job_id, self.owner, to="failed", error=f"{type(exc).__name__}: {exc}")
            self.store.add_event("job", "worker", "failed", json.dumps({"job": job_id, "error": str(exc)}))
            return "failed"
        if not jobs.finish(self.store, job_id, self.owner, triage=findings["triage"],
                           findings_json=json.dumps(findings), output_dir=str(out_dir)):
            jlog.warning("job finished but lease was lost; result discarded (the new owner writes it)")
            return "lease-lost"
        self.store.add_event("job", "worker", "done", json.dumps({"job": job_id, "triage": findings["triage"]}))
        jlog.info("job done", triage=findings["triage"])
        return "done"

    def _threshold(self, pipeline: str) -> float | None:
        triage = self.ctx.config.triage
        return triage.pancreas_threshold if pipeline == "pancreas" else triage.mammo_threshold

    def install_signal_handlers(self) -> None:
        def _stop(signum, frame) -> None:  # noqa: ARG001
            log.info("worker stopping", signal=signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
