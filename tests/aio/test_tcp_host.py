"""tcpencap.aio.tcp_host.WriteBatch: the frames of one NFQUEUE batch leave with one send
per connection, at the batch's end."""

from __future__ import annotations

from tcpencap.aio.tcp_host import WriteBatch


class Proto:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def flush_writes(self) -> None:
        self.log.append(self.name)


def test_the_connections_of_a_batch_are_flushed_once_at_its_end_in_order() -> None:
    log: list[str] = []
    a, b = Proto(log, "a"), Proto(log, "b")
    batch = WriteBatch()
    assert not batch.active
    batch.mark(True)
    assert batch.active
    batch.dirty += [a, b]
    assert log == []  # nothing leaves while the batch runs
    batch.mark(False)
    assert log == ["a", "b"] and batch.dirty == [] and not batch.active
    batch.mark(True)
    batch.mark(False)
    assert log == ["a", "b"]  # flushed once: the next batch starts clean


def test_a_connection_that_marks_itself_dirty_while_flushing_waits_for_the_next_batch() -> None:
    log: list[str] = []
    batch = WriteBatch()

    class Again(Proto):
        def flush_writes(self) -> None:
            super().flush_writes()
            batch.dirty.append(self)  # e.g. it got frames again from the flush's callback

    batch.mark(True)
    batch.dirty.append(Again(log, "x"))
    batch.mark(False)
    assert log == ["x"] and len(batch.dirty) == 1


def test_starting_a_batch_flushes_nothing() -> None:
    log: list[str] = []
    batch = WriteBatch()
    batch.dirty.append(Proto(log, "left"))  # marked when the last batch had ended
    batch.mark(True)
    assert log == []
    batch.mark(False)
    assert log == ["left"]
