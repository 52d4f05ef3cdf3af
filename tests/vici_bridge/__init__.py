"""Unit tests of vici_bridge/, one file per module (test_<module>.py)."""
