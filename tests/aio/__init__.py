"""Unit tests of tcpencap/aio/, one file per module (test_<module>.py)."""
