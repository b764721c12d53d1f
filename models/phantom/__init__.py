"""Synthetic phantom generators that write real DICOM (CT abdomen with pancreatic lesions, mammography).

Research use only: the phantoms train and test the reference models and the appliance pipeline; they
are not patients and nothing learnt from them alone is fit for clinical use.
"""
