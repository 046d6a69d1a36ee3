"""Helpers shared by every test directory, imported as `support.<module>` (tests/ is on sys.path: the
directory of the root conftest.py, in pytest's default import mode)."""
