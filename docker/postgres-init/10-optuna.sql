-- Runs once, when the postgres volume is first created: Optuna studies live in their own
-- database beside MLflow's, owned by the same user.
CREATE DATABASE optuna;
