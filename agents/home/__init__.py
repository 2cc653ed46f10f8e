"""The home agent: reads and controls Home Assistant through its REST API (scoped tier)."""
