"""Filter values the database cannot take are 400s with the field named, never 500s."""

from __future__ import annotations

import pytest

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("user=5854990468031340085248", "user"),
        ("key=-99999999999999999999", "key"),
        ("start=0345-09-23T20:07:18.490-13:02", "start"),
        ("end=9999-12-31T23:59:59-13:00", "end"),
    ],
)
def test_the_request_log_refuses_values_out_of_range(client, query, field):
    client.force_login(UserFactory())

    answer = client.get(f"/api/usage/?{query}")

    assert answer.status_code == 400
    assert list(answer.json()["fields"]) == [field]


def test_the_keys_owner_filter_refuses_an_id_beyond_64_bits(client):
    client.force_login(UserFactory())

    answer = client.get("/api/keys/?owner=99999999999999999999")

    assert answer.status_code == 400
