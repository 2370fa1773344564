"""What every step shares: params.yaml's schema, errors for people, atomic files, trial records,
the MLflow conventions, and code identity (which project files a module runs)."""
