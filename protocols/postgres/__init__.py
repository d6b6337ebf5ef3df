"""PostgreSQL wire protocol v3: a sans-IO codec."""
