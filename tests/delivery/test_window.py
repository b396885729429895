"""The window of calls in flight (docs/delivery.md, "How many calls at once"): it grows by one per
window of quick successes, halves on 429 or 503 or a latency twice the usual, at most once per
latency, and stays between 1 and the ceiling. A clock of our own: no test here waits."""

from __future__ import annotations

import threading
import time

import pytest

from refiner_source.delivery.window import Window


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def call(window: Window, clock: Clock, seconds: float, **outcome) -> None:
    started = window.acquire()
    clock.now += seconds
    window.release(started, **{"ok": True, **outcome})


def test_the_window_starts_at_4_within_its_ceiling():
    assert Window(32).limit == 4 and Window(2).limit == 2 and Window(1).limit == 1 and Window(0).limit == 1


def test_the_window_grows_by_one_per_window_of_quick_successes():
    clock = Clock()
    window = Window(32, clock=clock)
    for _ in range(4):
        call(window, clock, 0.05)
    assert 4.9 < window.limit < 5.0  # 4 + 1/4 + 1/4.25 + ...: one more per window's worth
    for _ in range(200):
        call(window, clock, 0.05)
    assert window.limit > 15


def test_the_window_never_passes_its_ceiling_nor_falls_below_one():
    clock = Clock()
    window = Window(6, clock=clock)
    for _ in range(500):
        call(window, clock, 0.01)
    assert window.limit == 6
    for _ in range(20):
        call(window, clock, 0.01, ok=False, pushback=True)
    assert window.limit == 1


def test_the_window_halves_on_pushback_once_for_the_calls_in_flight_then():
    clock = Clock()
    window = Window(64, start=16, clock=clock)
    call(window, clock, 0.2)
    before = window.limit
    first, second = window.acquire(), window.acquire()  # both in flight when the news comes
    clock.now += 0.01
    window.release(first, ok=False, pushback=True)
    assert window.limit == pytest.approx(before / 2)
    window.release(second, ok=False, pushback=True)  # the same news, from a call already in flight
    assert window.limit == pytest.approx(before / 2) and window.halved == 1
    call(window, clock, 0.01, ok=False, pushback=True)  # started after it halved: news of its own
    assert window.limit == pytest.approx(before / 4) and window.halved == 2


def test_the_window_halves_when_a_success_takes_twice_the_usual_latency():
    clock = Clock()
    window = Window(64, start=16, clock=clock)
    for _ in range(5):
        call(window, clock, 0.05)
    before = window.limit
    call(window, clock, 0.3)  # the destination is queueing our calls
    assert window.limit == pytest.approx(before / 2)


def test_a_destination_slower_for_good_is_not_halved_for_ever():
    clock = Clock()
    window = Window(64, start=16, clock=clock)
    call(window, clock, 0.05)
    for _ in range(400):
        call(window, clock, 0.3)
    halved = window.halved
    for _ in range(50):
        call(window, clock, 0.3)
    assert window.halved == halved and window.usual > 0.2  # the usual latency followed


def test_a_failure_that_is_no_pushback_leaves_the_window():
    clock = Clock()
    window = Window(32, clock=clock)
    call(window, clock, 0.05)
    before = window.limit
    call(window, clock, 30.0, ok=False)  # a timeout, a refusal: nothing said of the rate
    assert window.limit == before and window.halved == 0


def test_no_more_calls_than_the_window_are_in_flight():
    window = Window(3, start=2)
    inside, most, lock = 0, 0, threading.Lock()
    go = threading.Event()

    def lane() -> None:
        nonlocal inside, most
        started = window.acquire()
        with lock:
            inside += 1
            most = max(most, inside)
        go.wait(5)
        with lock:
            inside -= 1
        window.release(started, ok=False)

    threads = [threading.Thread(target=lane) for _ in range(6)]
    for thread in threads:
        thread.start()
    while window.in_flight < 2:
        time.sleep(0.001)
    go.set()
    for thread in threads:
        thread.join(5)
    assert most == 2 and window.in_flight == 0


def test_a_call_run_in_the_window_narrows_it_on_429_and_503_only():
    from refiner_source.delivery.answers import Rejected, RetryLater

    clock = Clock()
    window = Window(32, start=16, clock=clock)

    def answering(exc):
        def send(call):
            clock.now += 0.05
            if exc is not None:
                raise exc

        return send

    window.run(answering(None), "call")
    for exc in (RetryLater("HTTP 500", None, 500), RetryLater("down", None, None), Rejected(400, "no")):
        with pytest.raises(type(exc)):
            window.run(answering(exc), "call")
    assert window.halved == 0 and window.in_flight == 0
    for status in (429, 503):
        clock.now += 1
        with pytest.raises(RetryLater):
            window.run(answering(RetryLater(f"HTTP {status}", 1.0, status)), "call")
    assert window.halved == 2 and window.in_flight == 0
