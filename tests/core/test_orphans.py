"""Orphaned SAs on their own (tcpencap.core.orphans): taken by the connection that resumes
them in time, dropped when stale, forgotten when charon deletes them."""

from __future__ import annotations

from tcpencap.core.orphans import ORPHAN_GRACE, Orphans

PAIR = (bytes([198, 19, 0, 2]), bytes([198, 18, 1, 2]))
SPI_A, SPI_B = bytes(range(8)), bytes(range(8, 16))


def parked() -> Orphans:
    orphans = Orphans()
    orphans.park(10.0, PAIR, [SPI_A, SPI_B], [0xC0FFEE01], True)
    return orphans


def test_esp_or_ike_of_the_sas_resumes_them_in_time() -> None:
    for first in (None, SPI_B):
        orphans = parked()
        orphan = orphans.claim(10.0 + ORPHAN_GRACE, PAIR, first)
        assert orphan is not None and orphan.esp == [0xC0FFEE01] and orphan.sa_seen
        assert PAIR not in orphans


def test_a_new_sa_or_a_late_client_makes_the_orphan_stale() -> None:
    orphans = parked()
    assert orphans.claim(11.0, PAIR, bytes(8 * [0xAA])) is None  # another SA's IKE_SA_INIT
    assert not orphans  # dropped, not kept for a later claim
    orphans = parked()
    assert orphans.claim(10.1 + ORPHAN_GRACE, PAIR, None) is None
    assert Orphans().claim(0.0, PAIR, None) is None


def test_deleted_sas_and_expired_orphans_are_forgotten() -> None:
    orphans = parked()
    orphans.forget({SPI_A})
    assert orphans[PAIR].ike == [SPI_B]
    orphans.forget({SPI_B})
    assert not orphans
    orphans = parked()
    orphans.expire(10.0 + ORPHAN_GRACE)
    assert PAIR in orphans
    orphans.expire(10.1 + ORPHAN_GRACE)
    assert not orphans
