"""Start-up and shut-down hooks of the demo site (imported by twistedlrp at start)."""

import logging
import time

from twistedlrp.lifecycle import on_shutdown, on_startup

logger = logging.getLogger(__name__)

# Filled by the start-up hook before the first request can arrive.
BOOT = {}


@on_startup
def compute_boot_facts():
    # Stands in for expensive start-up work: loading a model, warming a cache.
    started = time.time()
    BOOT["primes"] = [n for n in range(2, 200) if all(n % d for d in range(2, int(n**0.5) + 1))]
    BOOT["started_at"] = started


@on_shutdown
def say_goodbye():
    logger.warning(
        "demo: shut-down hook ran after %.1f s of service", time.time() - BOOT["started_at"]
    )
