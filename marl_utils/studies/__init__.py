"""Studies whose numbers the docs pages report: does one base converge like separate models (parity over seeds,
docs/parity.md), and over-optimisation of a proxy reward against the gold reward (notebook 08).
"""
