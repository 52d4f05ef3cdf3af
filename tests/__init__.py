"""The test side of tcpencap: unit tests by layer (wire/, core/, aio/, native/, nfq/,
vici_bridge/, and the top-level modules here), lab tests (lab/), the lab harness (labkit/),
fuzz targets (fuzz/), checks of the checkout as shipped (project/) and the VM lab (vm/).
A package so that bench/ and the demo import the harness as ``tests.labkit``."""
