"""The program-aware co-scheduler and the LLM backends (not built yet; see DESIGN.md)."""
