"""The checkout as shipped: packaging, scripts/setup.sh, the example configurations."""
