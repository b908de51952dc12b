"""One blueprint per resource: models, datasets, audits, and meta (methods, health, docs)."""
