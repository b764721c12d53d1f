"""A store writer that a test kills with SIGKILL at random moments.

It prints each SOP instance UID only after store_instance() returned (the moment a C-STORE success
would be sent), so the test can check that everything acknowledged survived the kill.
"""

from __future__ import annotations

import os
import random
import sys

from edgescreen.appliance.store import Store, jobs
from edgescreen.appliance.store.instances import IncomingInstance, store_instance
from edgescreen.appliance.store.outbox import OutboxItem


def main(data_dir: str, seed: int) -> None:
    rng = random.Random(seed)
    store = Store(data_dir)
    n = 0
    while True:
        study = f"1.2.826.0.1.3680043.10.999.{seed}.{n // 20}"
        series = f"{study}.1"
        sop = f"{series}.{n}"
        data = os.urandom(rng.randint(1, 300_000))
        inst = IncomingInstance(sop, "1.2.840.10008.5.1.4.1.1.2", study, series, instance_number=n,
                                study={"patient_id": f"P{seed}"}, series={"modality": "CT"})
        store_instance(store, inst, data)
        print(sop, flush=True)
        if n % 20 == 19:
            jobs.enqueue(store, study, series, "pancreas")
            job = jobs.claim_next(store, "w", 60)
            # result, state change and export in one transaction
            jobs.finish(store, job["id"], "w", triage="not_suspicious", findings_json="{}", output_dir="",
                        outbox_items=[OutboxItem("pacs", f"pacs:{job['study_uid']}", {"study_uid": job["study_uid"]})])
        store.add_event("scanner", "test", "busy" if n % 2 else "idle")
        n += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
