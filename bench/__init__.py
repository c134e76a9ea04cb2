"""Benchmarks (standalone scripts); a package only so tests can import the helpers under bench/llm."""
