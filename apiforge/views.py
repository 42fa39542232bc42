"""The landing page at ``/``: where to go from here (the admin, the API docs, health)."""

from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.views.decorators.http import require_safe


@require_safe
def landing(request: HttpRequest) -> HttpResponse:
    return TemplateResponse(request, "landing.html", {})
