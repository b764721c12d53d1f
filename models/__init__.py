"""Reference models and their cards, the synthetic phantom generators (``models.phantom``) and the
training scripts (``models.train``)."""
