"""Wire formats: bytes to records and back, no state and no clock."""
