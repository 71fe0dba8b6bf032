"""The admission rule of docs/design.md section 5 and the accounting identity."""

import pytest

from staleness.controller import StalenessController


def test_capacity_formula():
    # B = 8, eta = 2, version 3: (3 + 2 + 1) * 8 = 48 rollouts may be accepted or running
    ctl = StalenessController(batch_size=8, max_staleness=2, version=3)
    assert ctl.capacity() == 48
    ctl.accepted, ctl.running = 40, 4
    assert ctl.can_admit(4)  # 40 + 4 + 4 = 48 <= 48: the last one starts at 47 < 48
    assert not ctl.can_admit(5)  # the fifth would start at 48, not < 48


def test_synchronous_never_admits_next_batch_before_publish():
    # eta = 0, B = 4, groups of 2: batch k+1's rollouts wait for version k+1
    ctl = StalenessController(batch_size=4, max_staleness=0)
    ctl.admit(2)
    ctl.admit(2)
    assert not ctl.can_admit(2)  # batch 0 is fully admitted
    ctl.finish(4)
    assert not ctl.can_admit(2)  # finished, but version 1 is not published yet
    ctl.consume(4, lags=[0, 0, 0, 0])
    assert not ctl.can_admit(2)  # consumed (training now), still version 0
    ctl.set_version(1)
    assert ctl.can_admit(2)


def test_staleness_allows_eta_batches_ahead():
    ctl = StalenessController(batch_size=4, max_staleness=2)
    for _ in range(6):  # (0 + 2 + 1) * 4 = 12 rollouts = 6 groups of 2
        ctl.admit(2)
    assert not ctl.can_admit(2)
    ctl.set_version(1)
    assert ctl.can_admit(2)


def test_pause_and_max_running():
    ctl = StalenessController(batch_size=8, max_staleness=4, max_running=4)
    ctl.admit(4)
    assert not ctl.can_admit(1)  # max_running
    ctl.finish(4)
    ctl.paused = True
    assert not ctl.can_admit(1)


def test_accounting_identity_and_reasons():
    ctl = StalenessController(batch_size=4, max_staleness=1)
    ctl.admit(4)
    ctl.admit(2)
    ctl.finish(4)
    ctl.drop_running(1, "error")
    ctl.consume(2, lags=[0, 1])
    ctl.drop_buffered(1, "stale")
    acc = ctl.accounting()
    # admitted 6 = consumed 2 + dropped 2 + in flight (1 running + 1 buffered)
    assert acc["admitted"] == 6 and acc["consumed"] == 2 and acc["dropped"] == {"error": 1, "stale": 1}
    assert acc["in_flight"] == 2 and acc["identity_holds"] and acc["max_lag_seen"] == 1


def test_misuse_raises():
    with pytest.raises(ValueError, match="max_staleness"):
        StalenessController(batch_size=4, max_staleness=-1)
    ctl = StalenessController(batch_size=2, max_staleness=0)
    with pytest.raises(RuntimeError):
        ctl.admit(3)
    with pytest.raises(RuntimeError):
        ctl.finish(1)
    ctl.set_version(2)
    with pytest.raises(RuntimeError):
        ctl.set_version(1)


def test_a_stale_drop_gives_its_admission_slots_back():
    # B = 2 (groups of 2), eta = 1: (0 + 1 + 1) * 2 = 4 rollouts may be admitted at version 0
    ctl = StalenessController(batch_size=2, max_staleness=1)
    ctl.admit(2)
    ctl.admit(2)
    assert not ctl.can_admit(2)  # 4 of 4
    ctl.finish(4)
    ctl.consume(2, lags=[0, 0])
    ctl.set_version(1)  # capacity (1 + 1 + 1) * 2 = 6; accepted 4 + running 0: 2 more
    ctl.drop_buffered(2, "stale")  # the other two were never trained on: they leave accepted
    # accepted 2 (the consumed ones) + running 0: the rule allows 6 - 2 = 4, not 2
    assert ctl.can_admit(4) and not ctl.can_admit(6)
    ctl.admit(4)
    ctl.finish(4)
    ctl.consume(2, lags=[1, 1])
    ctl.set_version(2)  # capacity 8, accepted 6: a full B more, as if nothing had been dropped
    assert ctl.can_admit(2) and not ctl.can_admit(4)
    acc = ctl.accounting()
    assert acc["identity_holds"] and acc["dropped"] == {"stale": 2} and acc["consumed"] == 4


def test_drops_for_any_reason_free_capacity_and_survive_a_checkpoint():
    ctl = StalenessController(batch_size=4, max_staleness=1)
    ctl.admit(4)
    ctl.admit(4)  # 8 of 8
    ctl.drop_running(2, "error")
    ctl.finish(6)
    ctl.drop_buffered(2, "zero_variance")
    assert ctl.accepted + ctl.running == 4 and ctl.can_admit(4)  # the 4 dropped ones are free again
    fresh = StalenessController(batch_size=4, max_staleness=1)
    fresh.load_state_dict(ctl.state_dict())  # buffered ones are un-admitted on resume
    assert fresh.accepted == 0 and fresh.running == 0 and fresh.can_admit(8)
    assert fresh.accounting()["identity_holds"]
