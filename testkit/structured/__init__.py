"""The structured-output corpus (real-world JSON schemas read from installed packages), its valid
and invalid instances, and the walked sample built from them: shared by tests/structured and
bench/structured.py, which measures on the same schemas the tests check. Sources and licences:
tests/structured/README.md."""
