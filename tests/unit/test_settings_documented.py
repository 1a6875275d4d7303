"""Settings is the one source of the service's configuration: the README's table lists every field
with the same default, and nothing else."""

import re
from pathlib import Path

from app.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", re.MULTILINE)


def documented_defaults() -> dict[str, str]:
    """{VARIABLE: first `code` span of its default cell} from the README's configuration table."""
    rows = {}
    for name, cell in ROW.findall(README.read_text()):
        spans = re.findall(r"`([^`]*)`", cell)
        rows[name] = spans[0] if spans else cell.strip()
    return rows


def shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()  # as an environment variable says it
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_setting_is_in_the_readme_with_its_default():
    documented = documented_defaults()
    fields = Settings.model_fields
    missing = sorted(name.upper() for name in fields if name.upper() not in documented)
    assert not missing, f"settings missing from the README configuration table: {missing}"
    wrong = {
        name.upper(): (documented[name.upper()], shown(field.default))
        for name, field in fields.items()
        if documented[name.upper()] != shown(field.default)
    }
    assert not wrong, f"README default differs from Settings (README, Settings): {wrong}"


def test_the_readme_documents_no_setting_that_does_not_exist():
    fields = {name.upper() for name in Settings.model_fields}
    assert sorted(set(documented_defaults()) - fields) == []


def test_every_setting_has_a_description():
    undescribed = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undescribed == []


def test_variables_that_nearly_spell_a_setting_are_named_with_the_setting():
    from app.settings import misspelt_settings

    environ = {
        "MAX_UPLOAD_BYTE": "1000",  # a letter short
        "inference_thread": "1",
        "MAX_UPLOAD_BYTES": "5",  # right
        "PATH": "/usr/bin",
        "HOSTNAME": "pod-1",
        "PWD": "/srv",
        "KUBERNETES_SERVICE_PORT": "443",
        "PYTHONPATH": "/srv",
    }
    assert misspelt_settings(environ) == [
        ("MAX_UPLOAD_BYTE", "MAX_UPLOAD_BYTES"),
        ("inference_thread", "INFERENCE_THREADS"),
    ]
