"""The usage ledger (one row per proxied call) and the audit trail."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class UsageRecord(models.Model):
    """One proxied call, written once by the usage consumer, never on the request path.

    ``event_id`` is the call's own unique id (made by the process that served it): a redelivered batch
    carries the same ids, so inserting it again changes nothing. ``request_id`` is the ``x-request-id`` of
    the answer, which a client may choose (and reuse): indexed, not unique, so a reused one loses no call.

    ``key`` and ``user`` are references without database constraints: the ledger outlives the keys and users
    it names, and rows arrive in bulk from a consumer that must not fail on a key deleted in the meantime.
    The prices in force at call time ride on the row, so its ``cost`` can always be checked.
    """

    event_id = models.CharField(max_length=40, unique=True)
    request_id = models.CharField(max_length=128, db_index=True)
    started_at = models.DateTimeField(help_text="When the call arrived.")
    ingested_at = models.DateTimeField(auto_now_add=True, db_index=True, help_text="When the ledger received it.")
    key = models.ForeignKey(
        "keys.ApiKey", null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    key_prefix = models.CharField(max_length=32, blank=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    model = models.CharField(max_length=128, blank=True)
    upstream = models.CharField(max_length=128, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    route = models.CharField(max_length=128, blank=True)
    endpoint = models.CharField(max_length=200)
    method = models.CharField(max_length=10, default="POST")
    status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    stream = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    input_price_per_1k = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    output_price_per_1k = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    cost = models.DecimalField(max_digits=20, decimal_places=10, default=0)
    latency_ms = models.FloatField(default=0)
    latency_bucket = models.PositiveSmallIntegerField(default=0, help_text="gateway_stats.histogram bucket.")
    ttfb_ms = models.FloatField(null=True, blank=True, help_text="Time to the first byte of a stream.")
    request_bytes = models.PositiveBigIntegerField(default=0)
    response_bytes = models.PositiveBigIntegerField(default=0)
    client_ip = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        verbose_name = "request log entry"
        verbose_name_plural = "request log"
        indexes = [
            models.Index(fields=["started_at"], name="usage_started"),
            models.Index(fields=["started_at", "key"], name="usage_started_key"),
            models.Index(fields=["started_at", "user"], name="usage_started_user"),
            models.Index(fields=["started_at", "model"], name="usage_started_model"),
            models.Index(fields=["key", "started_at"], name="usage_key_started"),
            models.Index(fields=["user", "started_at"], name="usage_user_started"),
            # /api/stats/errors reads the failed calls of a range only.
            models.Index(fields=["started_at"], condition=models.Q(status__gte=400), name="usage_errors_started"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.endpoint} {self.status}"


class AuditEvent(models.Model):
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit_events"
    )
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField(max_length=200, blank=True)
    changes = models.JSONField(default=dict, blank=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["object_type", "object_id"])]

    def __str__(self) -> str:
        return f"{self.action} {self.object_type}:{self.object_id}"


class UsageRollup(models.Model):
    """The ledger summed per minute, hour or day and per key, user, model, upstream and route.

    Written only by ``gateway_stats.rollups`` (whole buckets recomputed from the raw rows, minutes from
    the ledger, hours from minutes, days from hours), read by ``gateway_stats.stats``. ``latency`` is a
    sparse histogram ``{bucket index: count}`` of ``gateway_stats.histogram``: merging buckets adds counts,
    so percentiles over any range stay correct (never an average of averages). ``key_id`` and ``user_id``
    are plain numbers: like the ledger, the rollups outlive the keys and users they name.
    """

    # The additive numbers of a bucket (merging buckets adds them; the latency histogram merges apart).
    COUNTERS = (
        "requests",
        "errors_4xx",
        "errors_5xx",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "request_bytes",
        "response_bytes",
    )

    class Granularity(models.TextChoices):
        MINUTE = "minute"
        HOUR = "hour"
        DAY = "day"

    granularity = models.CharField(max_length=6, choices=Granularity.choices)
    bucket = models.DateTimeField(help_text="Start of the bucket (UTC).")
    key_id = models.BigIntegerField(null=True, blank=True)
    key_prefix = models.CharField(max_length=32, blank=True)
    user_id = models.BigIntegerField(null=True, blank=True)
    model = models.CharField(max_length=128, blank=True)
    upstream = models.CharField(max_length=128, blank=True)
    route = models.CharField(max_length=128, blank=True)
    requests = models.PositiveBigIntegerField(default=0)
    errors_4xx = models.PositiveBigIntegerField(default=0)
    errors_5xx = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=24, decimal_places=10, default=0)
    request_bytes = models.PositiveBigIntegerField(default=0)
    response_bytes = models.PositiveBigIntegerField(default=0)
    latency = models.JSONField(default=dict, blank=True, help_text="{histogram bucket index: count}.")

    class Meta:
        indexes = [
            models.Index(fields=["granularity", "bucket"], name="rollup_bucket"),
            models.Index(fields=["granularity", "user_id", "bucket"], name="rollup_user_bucket"),
            models.Index(fields=["granularity", "key_id", "bucket"], name="rollup_key_bucket"),
            models.Index(fields=["granularity", "model", "bucket"], name="rollup_model_bucket"),
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket:%Y-%m-%d %H:%M} {self.model or '-'} {self.requests}"


class UsageLatencyRollup(models.Model):
    """The latency histogram of every call of a minute, hour or day, whatever its key, user, model, upstream
    or route: the ``UsageRollup.latency`` of the bucket's rows added up (one row per bucket that has rollups).

    Written by ``gateway_stats.rollups`` with the rollups it totals (same ranges, same transactions), read by
    ``gateway_stats.stats`` for unfiltered statistics, so a month's percentiles add a few dozen histograms
    instead of the thousands of per-dimension ones.
    """

    granularity = models.CharField(max_length=6, choices=UsageRollup.Granularity.choices)
    bucket = models.DateTimeField(help_text="Start of the bucket (UTC).")
    latency = models.JSONField(default=dict, blank=True, help_text="{histogram bucket index: count}.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["granularity", "bucket"], name="latency_rollup_bucket_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket:%Y-%m-%d %H:%M} latency"


class UsageRollupState(models.Model):
    """How far the rollups have read the ledger: every rollup counts exactly the ledger rows of its bucket
    whose ``ingested_at`` is before ``watermark``; the statistics add the rows from ``watermark`` on."""

    name = models.CharField(max_length=32, primary_key=True)
    watermark = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} @ {self.watermark:%Y-%m-%d %H:%M:%S}"
