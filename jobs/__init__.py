"""Thin Spark entry points: argument parsing, the session, and wiring of pipeline/ functions."""
