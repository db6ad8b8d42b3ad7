"""Compatibility layers: one module per peer library whose contract we honour."""
