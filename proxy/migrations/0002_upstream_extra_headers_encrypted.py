# Upstream extra_headers: plaintext JSON -> Fernet ciphertext in a text column (issue 8, hole 14).

from django.db import migrations

import proxy.encryption


def encrypt_existing(apps, schema_editor):
    # After AlterField the column holds the old JSON as text; the field reads it as plaintext and writes it back
    # encrypted.
    Upstream = apps.get_model("proxy", "Upstream")
    for upstream in Upstream.objects.all().only("pk", "extra_headers"):
        Upstream.objects.filter(pk=upstream.pk).update(extra_headers=upstream.extra_headers or {})


class Migration(migrations.Migration):
    dependencies = [
        ("proxy", "0001_initial"),
    ]

    operations = [
        migrations.AlterField(
            model_name="upstream",
            name="extra_headers",
            field=proxy.encryption.EncryptedJSONField(blank=True, default=dict),
        ),
        migrations.RunPython(encrypt_existing, migrations.RunPython.noop),
    ]
