"""API keys: issue (shown once), digest storage, rotation, scopes, limits, cached verification."""

from django.apps import AppConfig
from django.conf import settings
from django.db.models.signals import post_save


class KeysConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "keys"
    verbose_name = "API keys"

    def ready(self) -> None:
        from keys.receivers import owner_saved

        post_save.connect(owner_saved, sender=settings.AUTH_USER_MODEL, dispatch_uid="keys.owner_saved")
