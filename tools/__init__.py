"""Tool registry and sandboxes for agent tool calls (not built yet; see DESIGN.md)."""
