#!/bin/sh
# Runs once, when the postgres volume is first created (after 10-optuna.sql): the role Optuna
# workers connect as. It may use the `optuna` database only - no superuser, no `mlflow` database.
# Names are variables so that tests/test_team_stack.py can run this very script natively.
set -eu
password="${OPTUNA_WORKER_PASSWORD:-}"
if [ "$password" = "change-me" ] || [ "${#password}" -lt 12 ]; then
    echo "postgres init: OPTUNA_WORKER_PASSWORD is empty, the example's 'change-me' or shorter than 12 characters: set a real one in .env" >&2
    exit 64
fi
worker="${OPTUNA_WORKER_USER:-optuna_worker}"
optuna_db="${OPTUNA_DB:-optuna}"
mlflow_db="${MLFLOW_DB:-mlflow}"
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres \
     -v worker="$worker" -v password="$OPTUNA_WORKER_PASSWORD" -v optuna_db="$optuna_db" -v mlflow_db="$mlflow_db" <<'SQL'
CREATE ROLE :"worker" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'password';
REVOKE CONNECT ON DATABASE :"mlflow_db" FROM PUBLIC;
REVOKE CONNECT ON DATABASE :"optuna_db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"optuna_db" TO :"worker";
SQL
# Optuna creates its tables on first use: the worker needs CREATE on the optuna database's schema.
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$optuna_db" -v worker="$worker" <<'SQL'
GRANT USAGE, CREATE ON SCHEMA public TO :"worker";
SQL
