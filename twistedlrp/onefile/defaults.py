"""
The settings of a site given with ``--app`` and no ``--settings`` (L{from_environment}):
``startproject``'s with twistedlrp installed, the database and secret key in the
state directory, and the ``--set`` values on top. No Twisted here.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import secrets
import sys
from pathlib import Path

#: The settings module of a site given with C{--app}.
SETTINGS_MODULE = "twistedlrp.onefile.settings"
#: The C{--app} value, its path absolute (L{twistedlrp.onefile.spec.AppSpec.as_value}).
APP_VARIABLE = "LRP_APP"
#: The C{--set} values and C{serve()} settings, a JSON object.
SETTINGS_VARIABLE = "LRP_APP_SETTINGS"
#: The absolute C{--state-dir}: the SQLite database and the secret key.
STATE_DIR_VARIABLE = "LRP_APP_STATE_DIR"
#: The command that started the server, when not C{twistd lrp --app} (C{python hello.py}).
COMMAND_VARIABLE = "LRP_APP_COMMAND"
CONTRIB_APPS = ("admin", "auth", "contenttypes", "sessions", "messages", "staticfiles")


def decode_value(text: str):
    """A C{--set} value: JSON if it parses, else a Python literal, else the text itself."""
    with contextlib.suppress(ValueError):
        return json.loads(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def setting_values(items: list[str]) -> dict:
    """@return: C{{NAME: value}} of C{--set NAME=VALUE} items (the last one of a name wins)."""
    pairs = (item.partition("=") for item in items)
    return {name.strip(): decode_value(text) for name, _, text in pairs}


def debug_from_environment() -> bool:
    return os.environ.get("DJANGO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def secret_key(state_dir: str | None) -> str:
    """@return: the key in C{state_dir/secret_key} (mode 0600, made once), or one for this process."""
    if not state_dir:
        return secrets.token_urlsafe(50)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "secret_key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path) as f:
            key = f.read().strip()
        if key:
            return key
        # Empty: a start that died between creating and writing it.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    key = secrets.token_urlsafe(50)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def startproject(base_dir: str, state_dir: str | None, key: str) -> dict:
    """The settings C{startproject} writes, with twistedlrp installed and our URLconf."""
    database = os.path.join(state_dir, "db.sqlite3") if state_dir else ":memory:"
    extra = [h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h.strip()]
    return {
        "BASE_DIR": Path(base_dir),
        "SECRET_KEY": key,
        "DEBUG": debug_from_environment(),
        "ALLOWED_HOSTS": ["localhost", "127.0.0.1", "[::1]", *extra],
        "INSTALLED_APPS": [*(f"django.contrib.{app}" for app in CONTRIB_APPS), "twistedlrp"],
        "MIDDLEWARE": [
            "django.middleware.security.SecurityMiddleware",
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
            "django.middleware.clickjacking.XFrameOptionsMiddleware",
        ],
        "ROOT_URLCONF": "twistedlrp.onefile.urls",
        "TEMPLATES": [
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "DIRS": [os.path.join(base_dir, "templates")],
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ],
                },
            }
        ],
        "DATABASES": {
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": database},
        },
        "AUTH_PASSWORD_VALIDATORS": [
            {"NAME": f"django.contrib.auth.password_validation.{name}"}
            for name in (
                "UserAttributeSimilarityValidator",
                "MinimumLengthValidator",
                "CommonPasswordValidator",
                "NumericPasswordValidator",
            )
        ],
        "LANGUAGE_CODE": "en-us",
        "TIME_ZONE": "UTC",
        "USE_I18N": True,
        "USE_TZ": True,
        "STATIC_URL": "static/",
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
    }


def nanodjango_settings(state_dir: str | None) -> dict | None:
    """
    @return: the settings of the nanodjango app being made (its C{Django()} imports
        the settings module) with twistedlrp installed, or C{None} if none is.
    """
    meta = sys.modules.get("nanodjango.app_meta")
    if meta is None or getattr(meta, "_app_module", None) is None:
        return None
    base = importlib.import_module("nanodjango.settings")
    values = {name: getattr(base, name) for name in dir(base) if name.isupper()}
    values["INSTALLED_APPS"] = [*values["INSTALLED_APPS"], "twistedlrp"]
    # As under gunicorn, where nanodjango turns DEBUG off at the first request.
    values["DEBUG"] = debug_from_environment()
    if not os.environ.get("DJANGO_SECRET_KEY"):
        values["SECRET_KEY"] = secret_key(state_dir)
    return values


def from_environment() -> dict:
    """@return: the settings of the site C{LRP_APP} names (nanodjango's, or L{startproject}'s)."""
    from twistedlrp.onefile.spec import parse

    if not (value := os.environ.get(APP_VARIABLE)):
        raise RuntimeError(
            f"{SETTINGS_MODULE} is the settings of a site given with twistd lrp --app; "
            f"{APP_VARIABLE} is not set"
        )
    spec = parse(value)
    state_dir = os.environ.get(STATE_DIR_VARIABLE) or None
    values = nanodjango_settings(state_dir)
    if values is None:
        values = startproject(spec.directory or os.getcwd(), state_dir, secret_key(state_dir))
    values.update(json.loads(os.environ.get(SETTINGS_VARIABLE) or "{}"))
    return values
