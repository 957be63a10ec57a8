"""orch planner: pure computation of what every GPU holds and how fast a plan runs.

This package imports only the standard library and pydantic. The single exception is
``planner.trace``, which imports torch and transformers lazily to trace real models.
"""
