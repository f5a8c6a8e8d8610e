"""HTTP routers of the control plane."""
