"""Unit tests of tcpencap/core/, one file per module (test_<module>.py)."""
