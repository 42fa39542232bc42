"""factory_boy factories shared by the suite (one per model; apps add theirs here)."""

from __future__ import annotations

import factory
from factory.django import DjangoModelFactory

from accounts.models import User

DEFAULT_PASSWORD = "correct-Horse-battery-staple-42"


class UserFactory(DjangoModelFactory):
    """An active, ordinary user whose password is ``DEFAULT_PASSWORD`` (override with ``password=``)."""

    class Meta:
        model = User
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    display_name = factory.LazyAttribute(lambda user: user.username.title())
    password = factory.django.Password(DEFAULT_PASSWORD)

    class Params:
        staff = factory.Trait(is_staff=True)
        superuser = factory.Trait(is_staff=True, is_superuser=True)
