"""The power-aware scheduler: when may inference run, and the worker that runs it.

Pure decision code (scanner.py, policy.py) takes the time and the readings as arguments, so the
worker on a box and the clinic-day simulator run exactly the same rules.
"""
