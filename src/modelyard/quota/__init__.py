"""Admission limits per key: the key registry (keys.py), one policy per key (policy.py: limits,
429s from limits.py, the fallback), counted in memory (memory.py) or shared through Redis
(redis.py, redis_scripts.py) or PostgreSQL (postgres.py)."""
