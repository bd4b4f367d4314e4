"""The work queue: ids go out one queue message per partition and come back in order.

Run here on kombu's in-process transport; tests/test_rabbitmq.py runs the same check against
the broker."""

from __future__ import annotations

import threading
from collections.abc import Callable

from kombu import Producer

from carehub.workqueue import WorkQueue, partition_of, patient_key


def receive(work_queue: WorkQueue, expected_ids: int, timeout: float = 10.0) -> list[list[int]]:
    """Consume until ``expected_ids`` ids have arrived; the id lists, one per queue message."""
    batches: list[list[int]] = []
    done = threading.Event()

    def deliver(ids: list[int], ack: Callable[[], None]) -> None:
        batches.append(ids)
        ack()
        if sum(len(b) for b in batches) >= expected_ids:
            done.set()

    consumer = work_queue.consumer(deliver)
    consumer.start()
    try:
        assert done.wait(timeout), f"only {batches} arrived"
    finally:
        consumer.stop()
    return batches


def check_grouped_delivery(url: str) -> None:
    work_queue = WorkQueue(url, partitions=3)
    work_queue.purge()
    keys = [patient_key(f"MRN{n % 5}", "HOSP", n) for n in range(40)]
    publisher = work_queue.publisher()
    try:
        publisher.publish_many(list(enumerate(keys, start=1)))
    finally:
        publisher.close()
    batches = receive(work_queue, 40)
    # One queue message per partition that had ids, each holding only that partition's ids.
    partitions = [{partition_of(keys[i - 1], 3) for i in batch} for batch in batches]
    assert all(len(p) == 1 for p in partitions)
    assert len(batches) == len({p.pop() for p in partitions})
    # Every id once, and each patient's ids in the order published.
    assert sorted(i for b in batches for i in b) == list(range(1, 41))
    for batch in batches:
        assert batch == sorted(batch)


def test_ids_are_grouped_by_partition_in_order() -> None:
    check_grouped_delivery("memory://")


def test_a_single_id_queue_message_from_an_earlier_version_is_still_routed() -> None:
    work_queue = WorkQueue("memory://", partitions=2)
    work_queue.purge()
    with work_queue.connection() as conn:
        channel = conn.channel()
        for queue in work_queue.queues:  # as a Publisher of that version declared them
            queue.bind(channel).declare()
        Producer(channel, exchange=work_queue.exchange).publish(
            {"message_id": 7}, routing_key="route.1", delivery_mode=2
        )
    assert receive(work_queue, 1) == [[7]]
