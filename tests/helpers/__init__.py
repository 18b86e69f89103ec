"""Shared test helpers (tests/ is on sys.path: `from helpers import training`)."""
