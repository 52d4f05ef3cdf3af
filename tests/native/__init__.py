"""Unit tests of tcpencap/native/ (the C data path, fastpath.c and its parts) against the
Python reference."""
