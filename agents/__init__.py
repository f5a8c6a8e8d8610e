"""Agent workflows and multi-agent pipelines (not built yet; see DESIGN.md)."""
