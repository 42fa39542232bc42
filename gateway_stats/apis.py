"""The statistics API: ``/api/stats/usage`` (time series), ``/api/stats/summary`` (totals and top keys, models,
upstreams) and ``/api/stats/errors`` (failed calls by error code, status, upstream and model).

Query parameters are checked by serializers (a 400 names each bad one); the numbers come from the
selectors in ``gateway_stats.stats``. ``?format=csv`` answers the usage and summary as CSV (``text/csv``,
the same numbers as the JSON). Who sees what: staff holding ``gateway_stats.view_usagerecord`` (and
superusers) see every call and may filter by ``user`` and ``key``; everyone else sees the calls of their
own keys only: a ``key`` or ``user`` filter naming someone else's matches nothing (an empty answer, not
an error, so the answer says nothing about other users' keys).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from django.http import Http404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import renderers, serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apiforge.permissions import staff_has_model_perm
from gateway_stats.models import UsageRecord
from gateway_stats.rollups import DAY, HOUR, MINUTE
from gateway_stats.stats import (
    GROUP_COLUMNS,
    INTERVALS,
    TOP_BY,
    UsageFilter,
    UsageNumbers,
    usage_errors,
    usage_summary,
    usage_time_series,
)

DEFAULT_RANGE = timedelta(hours=24)
# The longest range each interval may cover (a year by minute would be half a million points per series).
MAX_RANGES: dict[str, timedelta] = {MINUTE: timedelta(days=2), HOUR: timedelta(days=93), DAY: timedelta(days=800)}
SUMMARY_MAX_RANGE = timedelta(days=800)
ERRORS_MAX_RANGE = timedelta(days=31)
# Without ``interval``: minutes up to 6 hours, hours up to 7 days, days beyond.
AUTO_INTERVALS: tuple[tuple[timedelta, str], ...] = ((timedelta(hours=6), MINUTE), (timedelta(days=7), HOUR))
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)
MAX_ID = 2**63 - 1
TOP = 10
RECENT_REQUEST_IDS = 5
ERROR_GROUPS = 100

METRIC_COLUMNS = (
    "requests",
    "errors",
    "errors_4xx",
    "errors_5xx",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "request_bytes",
    "response_bytes",
)
LATENCY_COLUMNS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


# --- query parameters ------------------------------------------------------------------------------------


def _range_text(span: timedelta) -> str:
    return f"{span.days} days" if span >= timedelta(days=2) else f"{span.total_seconds() / 3600:g} hours"


class StatsQuerySerializer(serializers.Serializer):
    """The range and filters every statistics endpoint takes."""

    start = serializers.DateTimeField(
        required=False,
        help_text="ISO 8601 date-time (a date means its midnight; no offset means UTC), from 1970-01-01 to "
        "3000-01-01, before `end`. Default: `end` - 24 h. The range is limited (see the operation).",
    )
    end = serializers.DateTimeField(
        required=False, help_text="ISO 8601 date-time, exclusive, from 1970-01-01 to 3000-01-01. Default: now."
    )
    key = serializers.IntegerField(
        required=False, min_value=1, max_value=MAX_ID, help_text="Only the calls of this API key (its id)."
    )
    user = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ID,
        help_text="Only the calls of this user's keys (staff; for others only their own id matches anything).",
    )
    model = serializers.CharField(required=False, max_length=128, help_text="Only the calls of this public model.")

    max_range: ClassVar[timedelta] = SUMMARY_MAX_RANGE

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        for name in ("start", "end"):
            # Checked before the defaults are computed from them (0001-01-01 minus a day is an OverflowError).
            if name in attrs and not EARLIEST <= attrs[name] <= LATEST:
                raise ValidationError({name: ["Must be between 1970-01-01 and 3000-01-01."]})
        end = attrs.get("end") or timezone.now()
        start = attrs.get("start") or end - DEFAULT_RANGE
        if end <= start:
            raise ValidationError({"end": [f"Must be after start ({start.isoformat()}); it defaults to now."]})
        attrs["start"], attrs["end"] = start, end
        self.validate_range(attrs)
        return attrs

    def validate_range(self, attrs: dict[str, Any]) -> None:
        if attrs["end"] - attrs["start"] > self.max_range:
            raise ValidationError({"start": [f"The range may cover at most {_range_text(self.max_range)}."]})


class UsageQuerySerializer(StatsQuerySerializer):
    interval = serializers.ChoiceField(
        choices=INTERVALS,
        required=False,
        help_text="Bucket size. Default: minute up to 6 hours, hour up to 7 days, day beyond. "
        "At most 2 days by minute, 93 days by hour, 800 days by day.",
    )
    group_by = serializers.ChoiceField(
        choices=list(GROUP_COLUMNS),
        required=False,
        help_text="One series per key, user, model, upstream or route. Default: one series for all calls.",
    )

    def validate_range(self, attrs: dict[str, Any]) -> None:
        span = attrs["end"] - attrs["start"]
        interval = attrs.get("interval")
        if interval is None:
            attrs["interval"] = next((name for limit, name in AUTO_INTERVALS if span <= limit), DAY)
            if span > MAX_RANGES[DAY]:
                raise ValidationError({"start": [f"The range may cover at most {_range_text(MAX_RANGES[DAY])}."]})
        elif span > MAX_RANGES[interval]:
            raise ValidationError(
                {
                    "interval": [
                        f"A {interval} interval covers at most {_range_text(MAX_RANGES[interval])}; this range "
                        f"covers {_range_text(span)}: choose a coarser interval or a shorter range."
                    ]
                }
            )


class SummaryQuerySerializer(StatsQuerySerializer):
    top_by = serializers.ChoiceField(
        choices=TOP_BY, default="requests", help_text="What ranks the top keys, models and upstreams."
    )


class ErrorsQuerySerializer(StatsQuerySerializer):
    max_range = ERRORS_MAX_RANGE


# --- answers ---------------------------------------------------------------------------------------------


def _fields_named_like_attributes(
    fields: dict[str, serializers.Field], extra: dict[str, serializers.Field]
) -> dict[str, serializers.Field]:
    """``fields`` with ``extra`` inserted first: fields named like Serializer/Field attributes (``errors``,
    ``label``) cannot be class attributes without shadowing them for type checkers."""
    return {**extra, **fields}


class MetricsSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    errors_4xx = serializers.IntegerField(help_text="Calls answered 400-499 (499: the client went away).")
    errors_5xx = serializers.IntegerField(help_text="Calls answered 500 or above.")
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    cost = serializers.DecimalField(
        max_digits=24, decimal_places=10, help_text="Exact, from the prices in force at each call's time."
    )
    request_bytes = serializers.IntegerField()
    response_bytes = serializers.IntegerField()

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        errors = serializers.IntegerField(help_text="Calls answered 400 or above (errors_4xx + errors_5xx).")
        return _fields_named_like_attributes(fields, {"requests": fields.pop("requests"), "errors": errors})


class LatencyMetricsSerializer(MetricsSerializer):
    latency_p50_ms = serializers.FloatField(
        allow_null=True, help_text="Median latency, from merged fixed-bucket histograms (within about 4.4%)."
    )
    latency_p95_ms = serializers.FloatField(allow_null=True)
    latency_p99_ms = serializers.FloatField(allow_null=True)


class UsagePointSerializer(LatencyMetricsSerializer):
    bucket = serializers.DateTimeField(help_text="Start of the bucket (UTC).")


class UsageSeriesSerializer(serializers.Serializer):
    group = serializers.CharField(
        allow_null=True,
        help_text="The key or user id, or the model, upstream or route name; null for the calls without one "
        "(e.g. refused before a key was known), and for the single series without group_by.",
    )
    points = UsagePointSerializer(many=True, help_text="Buckets with calls only, oldest first.")

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        group = fields.pop("group")
        return _fields_named_like_attributes(fields, {"group": group, "label": _label()})


def _label() -> serializers.CharField:
    return serializers.CharField(allow_null=True, help_text="The key's prefix for keys; the group otherwise.")


class UsageSerializer(serializers.Serializer):
    start = serializers.DateTimeField(help_text="Rounded down to the interval.")
    end = serializers.DateTimeField(help_text="Rounded up to the interval (exclusive).")
    interval = serializers.ChoiceField(choices=INTERVALS)
    group_by = serializers.ChoiceField(choices=list(GROUP_COLUMNS), allow_null=True)
    series = UsageSeriesSerializer(many=True, help_text="The busiest first.")


class GroupTotalSerializer(MetricsSerializer):
    group = serializers.CharField(allow_null=True, help_text="Key id, model or upstream name (null: none).")

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        group = fields.pop("group")
        return _fields_named_like_attributes(fields, {"group": group, "label": _label()})


class SummarySerializer(serializers.Serializer):
    start = serializers.DateTimeField(help_text="Rounded down to the minute.")
    end = serializers.DateTimeField(help_text="Rounded up to the minute (exclusive).")
    top_by = serializers.ChoiceField(choices=TOP_BY)
    totals = LatencyMetricsSerializer()
    top_keys = GroupTotalSerializer(many=True, help_text=f"At most {TOP}.")
    top_models = GroupTotalSerializer(many=True, help_text=f"At most {TOP}.")
    top_upstreams = GroupTotalSerializer(many=True, help_text=f"At most {TOP}.")


class ErrorGroupSerializer(serializers.Serializer):
    error_code = serializers.CharField(help_text="The gateway's error code (empty when the answer had none).")
    status = serializers.IntegerField()
    upstream = serializers.CharField()
    model = serializers.CharField()
    count = serializers.IntegerField()
    last_at = serializers.DateTimeField(help_text="When the latest of these calls started.")
    request_ids = serializers.ListField(
        child=serializers.CharField(), help_text=f"The latest {RECENT_REQUEST_IDS} calls' request ids, newest first."
    )


class ErrorsSerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["errors"] = ErrorGroupSerializer(
            many=True, help_text=f"The {ERROR_GROUPS} most frequent groups, most first."
        )
        return fields


def _metrics(numbers: UsageNumbers, *, latency: bool = True) -> dict[str, Any]:
    values: dict[str, Any] = {
        "requests": numbers.requests,
        "errors": numbers.errors,
        "errors_4xx": numbers.errors_4xx,
        "errors_5xx": numbers.errors_5xx,
        "prompt_tokens": numbers.prompt_tokens,
        "completion_tokens": numbers.completion_tokens,
        "total_tokens": numbers.total_tokens,
        "cost": numbers.cost,
        "request_bytes": numbers.request_bytes,
        "response_bytes": numbers.response_bytes,
    }
    if latency:
        values.update(zip(LATENCY_COLUMNS, numbers.latency_percentiles(), strict=True))
    return values


# --- CSV -------------------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    # A text cell starting like a formula is quoted so that a spreadsheet shows it rather than evaluating it.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


class _CsvRenderer(renderers.BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def rows(self, data: Mapping[str, Any]) -> list[list[Any]]:
        raise NotImplementedError

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Mapping[str, Any] | None = None
    ) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([[_cell(value) for value in row] for row in self.rows(data)])
        return buffer.getvalue().encode()


class UsageCsvRenderer(_CsvRenderer):
    """One row per point: group, label, bucket, then the point's numbers."""

    def rows(self, data: Mapping[str, Any]) -> list[list[Any]]:
        columns = (*METRIC_COLUMNS, *LATENCY_COLUMNS)
        rows: list[list[Any]] = [["group", "label", "bucket", *columns]]
        for series in data["series"]:
            for point in series["points"]:
                rows.append([series["group"], series["label"], point["bucket"], *(point[name] for name in columns)])
        return rows


class SummaryCsvRenderer(_CsvRenderer):
    """A ``total`` row, then one row per top key (``top_keys``), model and upstream."""

    def rows(self, data: Mapping[str, Any]) -> list[list[Any]]:
        columns = (*METRIC_COLUMNS, *LATENCY_COLUMNS)
        totals = data["totals"]
        rows: list[list[Any]] = [["section", "group", "label", *columns]]
        rows.append(["total", None, None, *(totals[name] for name in columns)])
        for section in ("top_keys", "top_models", "top_upstreams"):
            for entry in data[section]:
                rows.append([section, entry["group"], entry["label"], *(entry.get(name) for name in columns)])
        return rows


# --- views -----------------------------------------------------------------------------------------------

_FORMAT = OpenApiParameter(
    "format", OpenApiTypes.STR, enum=["json", "csv"], required=False, description="`csv` for a CSV download."
)


class _StatsView(APIView):
    query_serializer: ClassVar[type[StatsQuerySerializer]] = StatsQuerySerializer

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        try:
            return super().perform_content_negotiation(request, force)
        except Http404 as exc:
            formats = [renderer.format for renderer in self.get_renderers() if renderer.format != "api"]
            raise ValidationError({"format": [f"Must be one of: {', '.join(formats)}."]}) from exc

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        # Errors are JSON (the project's error shape) even when CSV was asked for.
        if response.status_code >= 400 and isinstance(getattr(request, "accepted_renderer", None), _CsvRenderer):
            request.accepted_renderer = renderers.JSONRenderer()
            request.accepted_media_type = renderers.JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)

    def query(self, request: Request) -> tuple[dict[str, Any], UsageFilter]:
        params = request.query_params
        repeated = {name: ["Give this parameter once."] for name, values in params.lists() if len(values) > 1}
        if repeated:
            raise ValidationError(repeated)
        data = {name: value for name, value in params.items() if value != "" and name != "format"}
        serializer = self.query_serializer(data=data)
        serializer.is_valid(raise_exception=True)
        values = dict(serializer.validated_data)
        staff = staff_has_model_perm(request.user, "view", UsageRecord)
        flt = UsageFilter(
            scope_user_id=None if staff else request.user.pk,
            key_id=values.get("key"),
            user_id=values.get("user"),
            model=values.get("model"),
        )
        return values, flt


_WHO = (
    "Staff holding `gateway_stats.view_usagerecord` see every call and may filter by `user` and `key`; "
    "everyone else sees the calls of their own keys (a filter naming someone else's key or id matches nothing). "
)
_FRESH = (
    "A call counts from the moment it is in the ledger: rollups cover what they have read, the raw ledger "
    "the rest, and the two are merged (histograms included). "
)


class UsageStatsApi(_StatsView):
    renderer_classes = [renderers.JSONRenderer, renderers.BrowsableAPIRenderer, UsageCsvRenderer]
    query_serializer = UsageQuerySerializer

    @extend_schema(
        tags=["stats"],
        summary="Usage time series",
        description="Requests, errors, tokens, cost, bytes and latency percentiles per minute, hour or day "
        "(UTC), one series per group. `start` is rounded down and `end` up to the interval; buckets without "
        "calls are left out. " + _FRESH + _WHO + "`?format=csv`: one row per point.",
        parameters=[UsageQuerySerializer, _FORMAT],
        responses={(200, "application/json"): UsageSerializer, (200, "text/csv"): OpenApiTypes.STR},
    )
    def get(self, request: Request) -> Response:
        values, flt = self.query(request)
        result = usage_time_series(
            start=values["start"],
            end=values["end"],
            interval=values["interval"],
            group_by=values.get("group_by"),
            flt=flt,
        )
        data = {
            "start": result.start,
            "end": result.end,
            "interval": result.interval,
            "group_by": result.group_by,
            "series": [
                {
                    "group": series.group,
                    "label": series.label,
                    "points": [{"bucket": bucket, **_metrics(numbers)} for bucket, numbers in series.points],
                }
                for series in result.series
            ],
        }
        return Response(UsageSerializer(data).data)


class SummaryStatsApi(_StatsView):
    renderer_classes = [renderers.JSONRenderer, renderers.BrowsableAPIRenderer, SummaryCsvRenderer]
    query_serializer = SummaryQuerySerializer

    @extend_schema(
        tags=["stats"],
        summary="Usage summary",
        description="Totals over the range (rounded outward to whole minutes) with latency p50/p95/p99 from "
        f"merged histograms, and the top {TOP} keys, models and upstreams by requests or cost. At most 800 days. "
        + _FRESH
        + _WHO
        + "`?format=csv`: a `total` row, then one row per top entry (`section` says which list).",
        parameters=[SummaryQuerySerializer, _FORMAT],
        responses={(200, "application/json"): SummarySerializer, (200, "text/csv"): OpenApiTypes.STR},
    )
    def get(self, request: Request) -> Response:
        values, flt = self.query(request)
        result = usage_summary(start=values["start"], end=values["end"], flt=flt, top_by=values["top_by"], top=TOP)

        def tops(entries: list[Any]) -> list[dict[str, Any]]:
            return [
                {"group": entry.group, "label": entry.label, **_metrics(entry.numbers, latency=False)}
                for entry in entries
            ]

        data = {
            "start": result.start,
            "end": result.end,
            "top_by": values["top_by"],
            "totals": _metrics(result.totals),
            "top_keys": tops(result.top_keys),
            "top_models": tops(result.top_models),
            "top_upstreams": tops(result.top_upstreams),
        }
        return Response(SummarySerializer(data).data)


class ErrorsStatsApi(_StatsView):
    renderer_classes = [renderers.JSONRenderer, renderers.BrowsableAPIRenderer]
    query_serializer = ErrorsQuerySerializer

    @extend_schema(
        tags=["stats"],
        summary="Errors",
        description="Calls answered 400 or above, counted by error code, status, upstream and model, with the "
        f"latest {RECENT_REQUEST_IDS} request ids of each (look them up in the request log). From the raw "
        "ledger, so within its retention; at most 31 days. " + _WHO,
        parameters=[ErrorsQuerySerializer],
        responses={200: ErrorsSerializer},
    )
    def get(self, request: Request) -> Response:
        values, flt = self.query(request)
        groups = usage_errors(
            start=values["start"], end=values["end"], flt=flt, recent=RECENT_REQUEST_IDS, limit=ERROR_GROUPS
        )
        data = {
            "start": values["start"],
            "end": values["end"],
            "errors": [
                {
                    "error_code": group.error_code,
                    "status": group.status,
                    "upstream": group.upstream,
                    "model": group.model,
                    "count": group.count,
                    "last_at": group.last_at,
                    "request_ids": group.request_ids,
                }
                for group in groups
            ],
        }
        return Response(ErrorsSerializer(data).data)
