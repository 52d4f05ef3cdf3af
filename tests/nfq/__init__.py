"""Unit tests of nfq/, one file per module (test_<module>.py)."""
