"""Benchmark harness: ``python -m bench all`` writes docs/benchmarks.md (see ``__main__``).

Each scenario module ``pN_*.py`` has ``NAME``, ``TITLE``, a docstring that says what is measured
and how (copied into the report), and ``run(ctx) -> ScenarioResult``. Child processes live in
``_child.py``; peers (Dynamo, nginx, wrk, curl, etcdctl) in ``_peers.py``.
"""
