"""The validated-domain gate: never an all-clear for a study the models were not validated on.

Each model card states its domain (appliance.modelcard.Domain). Before any triage the pipeline checks
the study against it: (a) the DICOM attributes (attributes.py), (b) the body region's intensity
statistics against the training distribution (intensity.py), (c) the anatomical plausibility of stage
1's organs (anatomy.py), (d) a Mahalanobis distance on the model's own pooled features (ood.py). Any
failed check makes the study out of domain: triage `indeterminate` with every reason, never
`not_suspicious`. A pipeline whose main card states no domain at all is out of domain too: nothing
was validated, so nothing can be cleared.
"""

from edgescreen.appliance.pipeline.domain.verdict import DomainReport

__all__ = ["DomainReport"]
