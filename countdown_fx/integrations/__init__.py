"""Optional integrations (optimum, transformers generation); each imports its library lazily."""
