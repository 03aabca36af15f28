"""Metering, vouchers, settlement and verification: a plain library (no torch, no swarm)."""
