"""
The job table's hot statements in plain SQL, and the adapters of their values.

Submitting, claiming, finishing and progress run once or more per job; the
ORM's query building costs about ten times the SQL itself there. These few
statements are written out once; values still go through each field's own
C{get_db_prep_save}, so every database backend Django supports adapts them.

On PostgreSQL, text and jsonb columns cannot hold the NUL character: in a
job's output, error or progress message it is stored as U+FFFD (L{Statements.prep});
arguments holding one are refused at submission, a result holding one fails
the job (L{holds_nul}).
"""

from __future__ import annotations

import json
import uuid


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
        # Only these need the backend's adaptation; strings and numbers go as they are.
        self.adapted = {
            name
            for name, f in self.fields.items()
            if f.get_internal_type() in ("JSONField", "UUIDField", "DateTimeField")
        }
        # PostgreSQL's text columns refuse NUL; job output, errors and progress
        # messages may hold one (SQLite stores it as it is).
        self.nul_free = connection.vendor == "postgresql"
        self.text = (
            {
                n
                for n, f in self.fields.items()
                if f.get_internal_type() in ("CharField", "TextField")
            }
            if self.nul_free
            else set()
        )
        self.key_length = self.fields["key"].max_length
        names = list(self.fields)
        self.insert_names = names
        self.insert = (
            f"INSERT INTO {self.table} ({', '.join(self.column[n] for n in names)}) "
            f"VALUES ({', '.join(['%s'] * len(names))})"
        )
        self.claim = (
            f"UPDATE {self.table} SET {self.column['state']} = %s, "
            f"{self.column['attempts']} = {self.column['attempts']} + 1, "
            f"{self.column['started_at']} = %s, {self.column['worker']} = %s, "
            f"{self.column['node']} = %s "
            f"WHERE {self.column['id']} = %s AND {self.column['state']} = %s"
        )

    def prep(self, name: str, value):
        if value is None:
            return value
        if name in self.adapted:
            from django.db import connection

            return self.fields[name].get_db_prep_save(value, connection)
        if name in self.text and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value

    def update(
        self, job_id, values: dict, only_state: str | None = None, only_node: str | None = None
    ) -> int:
        """@return: the number of rows changed (0 or 1)."""
        from django.db import connection

        sets = ", ".join(f"{self.column[name]} = %s" for name in values)
        params = [self.prep(name, value) for name, value in values.items()]
        sql = f"UPDATE {self.table} SET {sets} WHERE {self.column['id']} = %s"
        params.append(self.prep("id", as_uuid(job_id)))
        if only_state is not None:
            sql += f" AND {self.column['state']} = %s"
            params.append(only_state)
        if only_node is not None:
            sql += f" AND {self.column['node']} = %s"
            params.append(only_node)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount


_sql: Statements | None = None


def statements() -> Statements:
    global _sql
    if _sql is None:
        _sql = Statements()
    return _sql


def holds_nul(value) -> bool:
    """@return: whether a JSON value holds a NUL character (which jsonb refuses)."""
    if value is None:
        return False
    text = json.dumps(value)
    # Fast and usually final; an escaped backslash before "u0000" is no NUL.
    return "\\u0000" in text and _nul_in(value)


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
