"""Unit tests of tcpencap/wire/, one file per module (test_<module>.py)."""
