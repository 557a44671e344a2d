"""Admission limits per key: in memory (memory.py), shared through Redis (redis.py) or
PostgreSQL (postgres.py), and what they share (limits.py: max_parallel, budgets)."""
