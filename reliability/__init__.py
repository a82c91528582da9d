"""Fault-injection harness and bounded soak for retain (not part of the installed package).

Run from the repository root: ``python -m reliability.soak --help``.
"""
