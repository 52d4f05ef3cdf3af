"""Lab tests: strongSwan charon and the tcpencap daemon in network namespaces (root; the
harness is tests/labkit). Also the harness's own tests (test_labkit*.py)."""
