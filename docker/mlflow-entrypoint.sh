#!/bin/sh
# The compose `mlflow` service: refuses the example's or a weak password, then starts
# `mlflow server` with basic-auth. The backend URI (with its password), the admin password and the
# key that signs the sign-in forms' CSRF tokens reach MLflow through its environment
# (MLFLOW_BACKEND_STORE_URI, MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY), never a
# command line. Paths and the bind address are variables so that
# tests/test_team_stack.py can run this very script natively.
set -eu

# A weak secret: empty, the example's, shorter than 12 characters, fewer than 8 different characters
# (aaaaaaaaaaaa, abcabcabcabc) or characters of one kind only (lowercase, uppercase, digits, others).
# The same rule is in docker/postgres-init/20-optuna-worker.sh; tests/test_team_stack.py holds both to it.
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

for name in POSTGRES_PASSWORD MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
    eval "value=\${$name:-}"
    if weak_secret "$value"; then
        echo "mlflow: $name is empty, the example's 'change-me' or weak: set one in .env with $RULE" >&2
        exit 64
    fi
done

auth_dir="${MLFLOW_AUTH_DIR:-/auth}"
mkdir -p "$auth_dir"
# Users and permissions live in their own SQLite file on the `mlauth` volume. READ: a signed-in
# user may read every experiment; writes need a permission the admin grants (or their own).
cat > "$auth_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_DEFAULT_PERMISSION:-READ}
database_uri = sqlite:///$auth_dir/basic_auth.db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
# MLflow's job runner (huey consumers for its GenAI jobs) is of no use to kdhar: off unless asked for,
# which spares the server its worker processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

exec mlflow server --app-name basic-auth \
    --serve-artifacts --artifacts-destination "${MLFLOW_ARTIFACTS:-/mlartifacts}" \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT_IN:-5000}" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS}" --workers "${MLFLOW_WORKERS:-2}"
