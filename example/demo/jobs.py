"""The demo's long job: importing contacts (imported by twistedlrp at start-up)."""

import random
import time
import uuid

from twistedlrp.jobs import JobCancelled, cancelled, job, progress

FIRST = "Ada Alan Barbara Claude Donald Edsger Frances Grace Guido Ken Linus Margaret".split()
LAST = "Lovelace Turing Liskov Shannon Knuth Dijkstra Allen Hopper Rossum Thompson".split()
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell"]


@job(timeout=600)
def import_contacts(count=5000, batch_size=250, delay=0.1):
    """
    Import C{count} generated contacts in batches, reporting progress and
    stopping between batches when cancelled.

    @param delay: seconds of simulated slow work per batch: it stands in for
        what makes real imports slow (an API to page through, addresses to check).
    @return: C{{"imported": n, "elapsed": seconds, "batch": id}}; the
        contacts carry the batch id.
    @raise JobCancelled: cancellation was requested (the batches already
        imported stay).
    """
    from demo.models import Contact

    started = time.monotonic()
    batch = uuid.uuid4().hex
    rng = random.Random(batch)
    imported = 0
    progress(0, count, "starting")
    while imported < count:
        if cancelled():
            raise JobCancelled(f"cancelled after {imported} contacts")
        n = min(batch_size, count - imported)
        contacts = []
        for i in range(imported, imported + n):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            contacts.append(
                Contact(
                    name=f"{first} {last}",
                    email=f"{first}.{last}.{i}@example.com".lower(),
                    company=rng.choice(COMPANIES),
                    phone=f"+1 555 {rng.randrange(10**7):07d}",
                    batch=batch,
                )
            )
        time.sleep(delay)
        Contact.objects.bulk_create(contacts)
        imported += n
        progress(imported, count, f"{imported:,} of {count:,} contacts imported")
    return {"imported": imported, "elapsed": round(time.monotonic() - started, 2), "batch": batch}
