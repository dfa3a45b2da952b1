"""labdeck's benchmarks: ``python3 -m tests.benchmarks`` runs them all (see __main__.py).

Files are named ``bench_*.py`` so pytest does not collect them; each reports
numbers beside a baseline measured in the same run, prints a table and writes
``tests/benchmarks/results/<name>.json``.
"""
