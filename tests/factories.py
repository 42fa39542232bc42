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


class ApiKeyFactory(DjangoModelFactory):
    """An active key without limits. Its secret (never stored) is on ``key.secret`` for the test to present."""

    class Meta:
        model = "keys.ApiKey"

    owner = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"key {n}")
    secret = factory.LazyFunction(lambda: _keys_hashing().key_secret_generate())
    prefix = factory.LazyAttribute(lambda key: _keys_hashing().key_secret_prefix(key.secret))
    digest = factory.LazyAttribute(lambda key: _keys_hashing().key_digest(key.secret))

    @classmethod
    def _create(cls, model_class, *args, **kwargs):  # type: ignore[no-untyped-def]
        secret = kwargs.pop("secret")
        key = super()._create(model_class, *args, **kwargs)
        key.secret = secret
        return key


def _keys_hashing():  # type: ignore[no-untyped-def]
    import keys.hashing

    return keys.hashing
