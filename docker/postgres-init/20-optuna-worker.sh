#!/bin/sh
# Runs once, when the postgres volume is first created (after 10-optuna.sql): the role Optuna
# workers connect as. It may use the `optuna` database only - no superuser, no `mlflow` database.
# Names are variables so that tests/test_team_stack.py can run this very script natively.
set -eu

# A weak secret: empty, the example's, shorter than 12 characters, fewer than 8 different characters
# (aaaaaaaaaaaa, abcabcabcabc) or characters of one kind only (lowercase, uppercase, digits, others).
# The same rule is in docker/mlflow-entrypoint.sh; tests/test_team_stack.py holds both to it.
weak_secret() {
    [ "$1" = "change-me" ] && return 0
    [ "${#1}" -lt 12 ] && return 0
    [ $(($(printf '%s' "$1" | fold -w1 | sort -u | wc -l))) -lt 8 ] && return 0
    kinds=0
    case "$1" in *[[:lower:]]*) kinds=$((kinds + 1)) ;; esac
    case "$1" in *[[:upper:]]*) kinds=$((kinds + 1)) ;; esac
    case "$1" in *[[:digit:]]*) kinds=$((kinds + 1)) ;; esac
    case "$1" in *[![:alnum:]]*) kinds=$((kinds + 1)) ;; esac
    [ "$kinds" -lt 2 ]
}
RULE="12 or more characters, 8 or more of them different, of at least two kinds (lowercase, uppercase, digits, others)"

password="${OPTUNA_WORKER_PASSWORD:-}"
if weak_secret "$password"; then
    echo "postgres init: OPTUNA_WORKER_PASSWORD is empty, the example's 'change-me' or weak: set one in .env with $RULE" >&2
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
