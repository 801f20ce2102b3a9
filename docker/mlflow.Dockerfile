# The official MLflow image, plus the PostgreSQL driver and the basic-auth app's Flask-WTF, which it
# does not ship, and the entrypoint that refuses weak passwords and turns authentication on.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 Flask-WTF==1.3.0
COPY mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint.sh
