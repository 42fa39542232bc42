"""The project's admin app config: Django's admin with APIForge's site (``apiforge.admin_site.AdminSite``)."""

from django.contrib.admin.apps import AdminConfig as DjangoAdminConfig


class AdminConfig(DjangoAdminConfig):
    default_site = "apiforge.admin_site.AdminSite"
