"""
C{manage.py lrp_prune --older-than 2d}: delete finished jobs by hand, in
batches of one transaction, as the job service's pruner does (both may run).
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from twistedlrp.jobs.service import retention

MAX_BATCH_SIZE = 10_000


class Command(BaseCommand):
    help = (
        "Delete the finished (succeeded, failed or cancelled) jobs that finished longer "
        "ago than --older-than (or, without it, than LRP_JOBS_KEEP and each job's own "
        "@job(keep=...))."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--older-than",
            metavar="DURATION",
            help="a number with a unit s, m, h, d or w (30m, 12h, 2d); without a unit: "
            "seconds. Applies to every job, whatever its keep",
        )
        parser.add_argument("--name", help="only the jobs of this registered name")
        parser.add_argument(
            "--dry-run", action="store_true", help="count the jobs it would delete; delete none"
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=retention.BATCH_SIZE,
            help=f"rows per statement and transaction [default: {retention.BATCH_SIZE}]",
        )

    def handle(self, *args, older_than=None, name=None, dry_run=False, batch_size=500, **options):
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            # Each row is a parameter of one statement; SQLite limits them.
            raise CommandError(
                f"--batch-size: must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}"
            )
        found = self._rules(older_than, name)
        if dry_run:
            n = sum(retention.count(rule) for rule in found)
            self.stdout.write(f"{n} finished job(s) would be deleted (dry run)")
            return
        n = sum(retention.prune(rule, batch_size) for rule in found)
        self.stdout.write(f"{n} finished job(s) deleted")

    def _rules(self, older_than, name) -> list[retention.Rule]:
        """@return: what to delete; @raise CommandError: a bad --older-than or LRP_JOBS_KEEP."""
        from twistedlrp.boot import BootError
        from twistedlrp.jobs import registry

        names = (name,) if name else None
        if older_than is not None:
            try:
                seconds = retention.parse_duration(older_than, "--older-than")
            except ValueError as e:
                raise CommandError(str(e)) from None
            return [retention.Rule(seconds, names)]
        # The keeps the server would apply: the job modules say them.
        try:
            registry.discover()
            default = retention.default_keep()
        except BootError as e:
            raise CommandError(str(e)) from None
        definitions = [registry.lookup(n) for n in registry.names()]
        found = retention.rules(default, definitions)
        if name:
            found = [
                retention.Rule(rule.keep, names)
                for rule in found
                if (rule.names is None and name not in rule.exclude)
                or (rule.names and name in rule.names)
            ]
        return found
