"""API keys: issue (shown once), digest storage, rotation, scopes, limits, cached verification."""

from django.apps import AppConfig
from django.conf import settings
from django.db.models.signals import post_save


class KeysConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "keys"
    verbose_name = "API keys"

    def ready(self) -> None:
        from gateway_stats.usage import usage_sink_register
        from keys.receivers import owner_saved
        from keys.selectors import key_record_by_digest, key_record_by_id
        from keys.services import key_usage_sink
        from keys.verification import key_record_by_id_reader_register, key_record_reader_register

        post_save.connect(owner_saved, sender=settings.AUTH_USER_MODEL, dispatch_uid="keys.owner_saved")
        # Each proxied call's key gets its last_used_at; the usage hand-off itself knows nothing of keys.
        usage_sink_register(key_usage_sink)
        # Verification (on the hot path) reads the database on a cache miss only through this reader.
        key_record_reader_register(lambda digest: key_record_by_digest(digest=digest))
        key_record_by_id_reader_register(lambda key_id: key_record_by_id(key_id=key_id))
