"""Where outcomes go: PostgreSQL, Neo4j, the results exchange; Redis for progress and the cache."""
