"""The admin's inline formsets whose rows a service saves (not the formset itself): shared plumbing."""

from __future__ import annotations

from django import forms
from django.forms.models import BaseInlineFormSet


class ServiceSavedInlineFormSet(BaseInlineFormSet):
    """An inline formset whose rows are handed to a service as a whole (model deployments, route targets):
    which rows stay, and the history entry ``save()`` would have noted."""

    def _deleting(self, form: forms.BaseForm) -> bool:
        return bool(self.can_delete and getattr(form, "cleaned_data", {}).get("DELETE"))

    def history_note(self) -> None:
        """What ``save()`` would have noted for the admin's history entry (its change message reads it)."""
        kept = [form for form in self.forms if not self._deleting(form)]
        self.new_objects = [form.instance for form in kept if form.instance.pk is None and form.has_changed()]
        self.changed_objects = [
            (form.instance, form.changed_data) for form in kept if form.instance.pk is not None and form.has_changed()
        ]
        self.deleted_objects = [
            form.instance for form in self.forms if form.instance.pk is not None and self._deleting(form)
        ]
