"""What the tests and the benchmarks both need to stand a system up: the one server-process
harness (`servers`), the one polling helper (`until`), the one scripted OpenAI-compatible
upstream (`upstream`), and real PostgreSQL (`pg`) and Redis (`redis_server`) servers.

It is a top-level package beside `tests/` and `bench/` rather than inside either, because both
import it and neither should reach into the other: before it, bench/ put tests/quota,
tests/control and tests/structured on sys.path to borrow fixtures, and the two server wrappers
(tests/servers.py, bench/common.py's ServerProc) drifted apart. It is no part of the product
(setuptools finds packages under src/ only).

How it is found: pytest puts the repository root on sys.path (`pythonpath` in pyproject.toml's
[tool.pytest.ini_options]); a bench script does it in one line (bench/common.py, which every
script imports first). Nothing here imports pytest, so the benchmarks run without it.
"""
