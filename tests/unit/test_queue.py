"""The job service's in-memory queue, driven by a fake clock."""

from twisted.internet.task import Clock

from twistedlrp.jobs.service.queue import JobQueue, JobRecord


def make_queue():
    clock = Clock()
    due = []
    return clock, JobQueue(clock, lambda: due.append(clock.seconds())), due


def drain(queue) -> list[str]:
    ids = []
    while (record := queue.pop()) is not None:
        ids.append(record.id)
    return ids


def test_higher_priority_first_then_older_first():
    _, queue, _ = make_queue()
    queue.push(JobRecord("old-low", priority=0, created=1.0))
    queue.push(JobRecord("new-high", priority=5, created=3.0))
    queue.push(JobRecord("old-high", priority=5, created=2.0))
    queue.push(JobRecord("new-low", priority=0, created=4.0))
    assert len(queue) == 4
    assert drain(queue) == ["old-high", "new-high", "old-low", "new-low"]
    assert len(queue) == 0


def test_a_delayed_job_waits_for_its_time_on_the_clock():
    clock, queue, due = make_queue()
    queue.push(JobRecord("later", created=0.0), not_before=10.0)
    queue.push(JobRecord("now", created=1.0))
    assert queue.next_due() == 10.0
    assert drain(queue) == ["now"]
    assert "later" in queue and not queue.has_ready()
    clock.advance(9.9)
    assert due == [] and queue.pop() is None
    clock.advance(0.1)
    assert due == [10.0]
    assert drain(queue) == ["later"]


def test_one_timer_for_the_earliest_delayed_job():
    clock, queue, due = make_queue()
    queue.push(JobRecord("b"), not_before=20.0)
    queue.push(JobRecord("a"), not_before=5.0)
    queue.push(JobRecord("c"), not_before=30.0)
    assert len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() == 5.0
    clock.advance(5)
    assert drain(queue) == ["a"]
    clock.advance(15)
    assert drain(queue) == ["b"]
    assert due == [5.0, 20.0]
    assert clock.getDelayedCalls()[0].getTime() == 30.0


def test_a_time_already_past_is_ready_at_once():
    clock, queue, _ = make_queue()
    clock.advance(100)
    queue.push(JobRecord("late"), not_before=50.0)
    assert clock.getDelayedCalls() == []
    assert drain(queue) == ["late"]


def test_removed_jobs_are_never_popped_and_requeued_ones_once():
    clock, queue, due = make_queue()
    first = JobRecord("x", created=1.0)
    queue.push(first)
    queue.push(JobRecord("y", created=2.0))
    assert queue.remove("x") is first
    assert queue.remove("x") is None
    queue.push(first)  # queued again (a retry): one entry counts
    assert drain(queue) == ["x", "y"]
    queue.push(JobRecord("z"), not_before=5.0)
    queue.remove("z")
    clock.advance(10)
    assert drain(queue) == []


def test_pause_stops_the_timer_and_keeps_the_delayed_jobs():
    clock, queue, due = make_queue()
    queue.push(JobRecord("d"), not_before=5.0)
    queue.pause()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert due == [] and "d" in queue


def test_requeued_clears_what_belonged_to_the_attempt():
    clock = Clock()
    record = JobRecord("r", attempts=2, payload=b"{}")
    record.worker = object()
    record.progress = (3, 10, "x")
    record.cancel_requested = True
    timer = clock.callLater(5, lambda: None)
    record.timers.append(timer)
    assert record.requeued() is record
    assert (record.worker, record.progress, record.cancel_requested) == (None, (0, None, ""), False)
    assert not timer.active() and record.timers == []
    assert (record.attempts, record.payload) == (2, b"{}")
