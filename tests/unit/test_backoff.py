"""Backoff delays (full jitter, cap, Retry-After) and Retry-After parsing."""

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sinks.http import batch_idempotency_key, parse_retry_after
from config.backoff import Backoff, full_jitter


def test_full_jitter_stays_within_the_exponential_ceiling():
    rng = random.Random(7)
    for attempt in range(8):
        ceiling = min(1.0, 0.01 * 2**attempt)
        delays = [full_jitter(attempt, 0.01, 1.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(delays) < ceiling * 0.2
        assert max(delays) > ceiling * 0.8


def test_seeded_rng_gives_the_same_sequence():
    a = Backoff(0.01, 1.0, random.Random(42))
    b = Backoff(0.01, 1.0, random.Random(42))
    assert [a.next_delay() for _ in range(10)] == [b.next_delay() for _ in range(10)]


def test_delays_grow_and_are_capped_at_maximum():
    backoff = Backoff(0.01, 0.1, random.Random(1))
    delays = [backoff.next_delay() for _ in range(100)]
    assert all(0.0 <= d <= 0.1 for d in delays)
    assert backoff.failures == 100
    # Late delays may use the whole capped range; early ones cannot.
    assert max(delays[:2]) <= 0.02
    assert max(delays[10:]) > 0.05


def test_huge_attempt_numbers_do_not_overflow():
    assert 0.0 <= full_jitter(10_000, 1.0, 60.0, random.Random(0)) <= 60.0


def test_reset_starts_again_from_initial():
    backoff = Backoff(0.01, 10.0, random.Random(3))
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_delay() <= 0.01


def test_retry_after_is_a_floor_capped_at_maximum():
    backoff = Backoff(0.01, 5.0, random.Random(5))
    assert backoff.next_delay(retry_after=2.0) == 2.0
    assert backoff.next_delay(retry_after=3600.0) == 5.0
    # A Retry-After of 0 does not shorten the jittered delay below zero or raise.
    assert 0.0 <= backoff.next_delay(retry_after=0.0) <= 5.0


def test_invalid_policy_is_refused():
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        full_jitter(-1, 1.0, 1.0, random.Random())


@given(st.integers(min_value=0, max_value=200), st.floats(min_value=1e-3, max_value=10),
       st.floats(min_value=1e-3, max_value=100), st.integers())
def test_jitter_bounds_property(attempt, initial, maximum, seed):
    delay = full_jitter(attempt, initial, maximum, random.Random(seed))
    assert 0.0 <= delay <= min(maximum, initial * 2.0**attempt) + 1e-12


@pytest.mark.parametrize(("header", "expected"), [
    ("2", 2.0),
    (" 120 ", 120.0),
    ("1.5", 1.5),
    ("0", 0.0),
    ("-5", 0.0),
    ("soon", None),
    ("", None),
    ("nan", None),
    ("inf", None),
    (None, None),
])
def test_parse_retry_after_seconds(header, expected):
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now) == 30.0
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier, now=now) == 0.0
    assert parse_retry_after("Fri, 99 Foo 2026 25:61:00 GMT", now=now) is None


def test_batch_idempotency_key_is_sha256_of_ids_joined_with_newlines():
    import hashlib

    assert batch_idempotency_key(["a", "b"]) == hashlib.sha256(b"a\nb").hexdigest()
    assert batch_idempotency_key(["a", "b"]) != batch_idempotency_key(["b", "a"])
