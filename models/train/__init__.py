"""Training scripts for the reference models (torch, training only; the appliance never imports these)."""

import os

# Before any trainer loads torch's OpenMP runtime: waiting threads sleep instead of spinning, so a
# trainer that shares its cores with another job slows down in proportion instead of several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
