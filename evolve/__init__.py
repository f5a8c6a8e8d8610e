"""Squeeze-Evolve multi-model evolutionary inference (not built yet; see DESIGN.md)."""
