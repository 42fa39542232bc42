"""The limit fields' migrations (accounts 0003, proxy 0004) apply to a database holding users and models, give
the existing rows no limits and the default output estimate, and can be reversed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

BEFORE = [("accounts", "0002_user_case_insensitive_unique"), ("proxy", "0003_routes")]
AFTER = [("accounts", "0003_user_limits"), ("proxy", "0004_model_limits")]


def _columns(table: str) -> set[str]:
    with connection.cursor() as cursor:
        return {column.name for column in connection.introspection.get_table_description(cursor, table)}


@pytest.fixture
def executor() -> Iterator[MigrationExecutor]:
    executor = MigrationExecutor(connection)
    yield executor
    # Leave the schema as the rest of the suite expects it, whatever the test did.
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.mark.django_db(transaction=True)
def test_the_limit_migrations_apply_to_existing_rows_and_reverse(executor: MigrationExecutor) -> None:
    executor.migrate(BEFORE)
    assert not {"rpm_limit", "budget_cost", "budget_period"} & _columns("accounts_user")
    assert not {"rpm_limit", "tpm_limit", "output_tokens_estimate"} & _columns("proxy_model")
    old = executor.loader.project_state(BEFORE).apps
    old.get_model("accounts", "User").objects.create(username="old", email="old@example.com")
    old.get_model("proxy", "Model").objects.create(name="old-model")

    executor = MigrationExecutor(connection)  # a fresh loader sees the applied state
    executor.migrate(AFTER)

    new = executor.loader.project_state(AFTER).apps
    user = new.get_model("accounts", "User").objects.get(username="old")
    model = new.get_model("proxy", "Model").objects.get(name="old-model")
    assert (user.rpm_limit, user.budget_cost, user.budget_period) == (None, None, "month")
    assert (model.rpm_limit, model.tpm_limit, model.output_tokens_estimate) == (None, None, 256)

    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    assert not {"rpm_limit", "budget_cost", "budget_period"} & _columns("accounts_user")
    assert not {"rpm_limit", "tpm_limit", "output_tokens_estimate"} & _columns("proxy_model")
