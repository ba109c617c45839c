"""Quality evaluation that does not grade the model against itself (`blockdiff eval`).

tasks.py (the shipped task set) -> runner.py (decode per configuration) -> scoring.py and
sandbox.py (unit tests in a subprocess, exact match) -> report.py (table, JSON, PNG).
"""
