#!/usr/bin/env python
"""Django's command-line utility, for a checkout: development settings unless ``APP_ENV`` says otherwise.

Like cookiecutter-django's ``manage.py``, a command run from a checkout (``manage.py create_api_key ...``,
``manage.py changepassword``) gets the development defaults; the ASGI entry point (``apiforge/asgi.py``) keeps
production as its default, and so do the Docker image and the env file, which set ``APP_ENV=production``.
A configuration error is one line on stderr and exit status 2, not a traceback.
"""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apiforge.settings")
    os.environ.setdefault("APP_ENV", "development")
    from django.core.exceptions import ImproperlyConfigured

    try:
        from django.conf import settings

        settings.INSTALLED_APPS  # noqa: B018 - loads the settings, where configuration errors are raised
    except ImproperlyConfigured as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None

    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
