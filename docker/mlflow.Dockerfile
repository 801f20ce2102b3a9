# The official MLflow image, plus the PostgreSQL driver it does not ship.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13
