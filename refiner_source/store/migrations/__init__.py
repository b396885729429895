"""The store's Alembic migrations: env.py, and one revision a schema change in versions/."""
