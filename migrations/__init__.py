"""Alembic environment and versions: the only way the schema changes (``saliency-audit db
upgrade``). Shipped as a package so that an installed service finds its migrations."""
