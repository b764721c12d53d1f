"""edgescreen appliance: everything that runs on the box.

Reference models shipped with edgescreen are trained on synthetic phantoms (CT) and on
mini-MIAS (mammography). They exist for research, demonstration and pipeline validation.
"""

__version__ = "0.1.0"

RESEARCH_USE_BANNER = (
    "RESEARCH USE ONLY - NOT FOR CLINICAL USE. The reference CT models were trained on synthetic "
    "phantoms and the mammography model on mini-MIAS; results must not guide diagnosis or treatment."
)
