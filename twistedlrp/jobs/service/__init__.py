"""The job service: its life, the operations it answers, dispatching jobs to workers, recording outcomes, its node's lease, the watchdog, periodic jobs and retention."""
