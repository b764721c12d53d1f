"""The fleet receiver: the cloud side of sync. Stores what edge boxes send, once, in SQLite or PostgreSQL."""
