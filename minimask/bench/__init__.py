"""Benchmarks behind ``minimask bench``: they print numbers; no test asserts on time."""
