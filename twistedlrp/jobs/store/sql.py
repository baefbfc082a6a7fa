"""
The job table's hot statements in plain SQL (the ORM costs about ten times
the SQL), with Django's adapters and converters, written out on SQLite.
PostgreSQL's text and jsonb cannot hold NUL: a message stores it as U+FFFD,
arguments holding one are refused, a result holding one fails the job.
"""

from __future__ import annotations

import functools
import json
import threading
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace


class Statements:
    """The job table's statements and field adapters (built once)."""

    def __init__(self):
        from django.db import connection
        from django.db.models import NOT_PROVIDED

        from twistedlrp.models import Job

        quote = connection.ops.quote_name
        self.fields = {f.name: f for f in Job._meta.concrete_fields}
        self.table = quote(Job._meta.db_table)
        self.column = {name: quote(f.column) for name, f in self.fields.items()}
        # Callable defaults (the id, the JSON arguments) are always given.
        self.defaults = {
            name: f.get_default()
            for name, f in self.fields.items()
            if f.default is NOT_PROVIDED or not callable(f.default)
        }
        # PostgreSQL's text columns refuse NUL (SQLite stores it as it is).
        self.nul_free = connection.vendor == "postgresql"
        texts = ("CharField", "TextField") if self.nul_free else ()
        self.text = {n for n, f in self.fields.items() if f.get_internal_type() in texts}
        # Only these need the backend's adaptation; strings and numbers go as they are.
        self.adapters = {
            name: self._adapter(f, connection)
            for name, f in self.fields.items()
            if f.get_internal_type() in ("JSONField", "UUIDField", "DateTimeField")
        }
        # The DB-API connection is used directly on SQLite (placeholders "?").
        self.direct = connection.vendor == "sqlite"
        self._local = threading.local()
        self.insert_names = names = list(self.fields)
        self.insert = (
            f"INSERT INTO {self.table} ({', '.join(self.column[n] for n in names)}) "
            f"VALUES ({', '.join(['%s'] * len(names))})"
        )
        self.select = f"SELECT {', '.join(self.column[n] for n in names)} FROM {self.table} WHERE "
        c = self.column
        self.claim = (
            f"UPDATE {self.table} SET {c['state']} = %s, {c['attempts']} = {c['attempts']} + 1, "
            f"{c['started_at']} = %s, {c['worker']} = %s, {c['node']} = %s "
            f"WHERE {c['id']} = %s AND {c['state']} = %s"
        )

    @staticmethod
    def _adapter(field, connection):
        """@return: C{field}'s C{get_db_prep_save}, or on SQLite the same written out (cheaper)."""
        from django.conf import settings

        kind = field.get_internal_type()

        def generic(value):
            from django.db import connection

            return field.get_db_prep_save(value, connection)

        if connection.vendor != "sqlite":
            return generic
        if kind == "UUIDField":
            return lambda value: value.hex if isinstance(value, uuid.UUID) else generic(value)
        if kind == "JSONField":
            return functools.partial(json.dumps, cls=field.encoder)
        if kind == "DateTimeField" and settings.USE_TZ and connection.timezone_name == "UTC":
            # A naive datetime means the current time zone to Django: its path.
            return lambda value: (
                str(value.astimezone(UTC).replace(tzinfo=None))
                if isinstance(value, datetime) and value.tzinfo is not None
                else generic(value)
            )
        return generic

    def prep(self, name: str, value):
        if value is None:
            return value
        adapter = self.adapters.get(name)
        if adapter is not None:
            return adapter(value)
        if name in self.text and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value

    def execute(self, statement: str, params) -> int:
        """@return: the rows a statement (values as C{%s}) changed, in this thread's transaction."""
        return self.run(statement, params, lambda cursor: cursor.rowcount)

    def read(self, job_id=None, **equal) -> SimpleNamespace | None:
        """
        @return: the job C{job_id}, or the first row whose fields have the values
            (or one of the tuple of values) in C{equal}, as attributes; or C{None}.
        """
        if job_id is not None:
            equal = {"id": as_uuid(job_id)}
        where, params = [], []
        for name, value in equal.items():
            values = value if isinstance(value, tuple) else (value,)
            where.append(f"{self.column[name]} IN ({', '.join(['%s'] * len(values))})")
            params.extend(self.prep(name, v) for v in values)
        statement = f"{self.select}{' AND '.join(where)} LIMIT 1"
        row = self.run(statement, params, lambda cursor: cursor.fetchone())
        if row is None:
            return None
        from django.db import connection

        converters = self._converters()
        values = {}
        for name, value in zip(self.insert_names, row, strict=True):
            for convert, expression in converters[name]:
                value = convert(value, expression, connection)
            values[name] = value
        return SimpleNamespace(**values)

    def _converters(self) -> dict:
        converters = getattr(self._local, "converters", None)
        if converters is None:
            from django.db import connection

            converters = self._local.converters = {}
            for name, field in self.fields.items():
                column = field.get_col(field.model._meta.db_table)
                found = connection.ops.get_db_converters(column)
                found += column.get_db_converters(connection)
                converters[name] = [(convert, column) for convert in found]
        return converters

    def run(self, statement: str, params, result):
        """@return: C{result(cursor)} of a statement run in this thread's transaction."""
        if not self.direct:
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute(statement, params)
                return result(cursor)
        database = getattr(self._local, "database", None)
        if database is None:
            from django.db import DEFAULT_DB_ALIAS, connections

            database = self._local.database = connections[DEFAULT_DB_ALIAS]
        if database.connection is None:
            database.ensure_connection()
        # Errors still come as Django's, and mark the connection as its cursors would.
        with database.wrap_database_errors:
            cursor = database.connection.execute(statement.replace("%s", "?"), params)
            try:
                return result(cursor)
            finally:
                cursor.close()

    def update(
        self, job_id, values: dict, only_state: str | None = None, only_node: str | None = None
    ) -> int:
        """@return: the number of rows changed (0 or 1)."""
        sets = ", ".join(f"{self.column[name]} = %s" for name in values)
        params = [self.prep(name, value) for name, value in values.items()]
        sql = f"UPDATE {self.table} SET {sets} WHERE {self.column['id']} = %s"
        params.append(self.prep("id", as_uuid(job_id)))
        for name, value in (("state", only_state), ("node", only_node)):
            if value is not None:
                sql += f" AND {self.column[name]} = %s"
                params.append(value)
        return self.execute(sql, params)


@functools.cache
def statements() -> Statements:
    return Statements()


def holds_nul(value) -> bool:
    """@return: whether a JSON value holds a NUL character (which jsonb refuses)."""
    # Fast and usually final; an escaped backslash before "u0000" is no NUL.
    return "\\u0000" in json.dumps(value) and _nul_in(value)


def _nul_in(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_nul_in(k) or _nul_in(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_nul_in(v) for v in value)
    return False


def as_uuid(value) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
