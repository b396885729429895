"""A body read as it arrives (refiner_source/web/stream.py): each element of an array with its exact
text, whatever the chunks; the same refusals as a body parsed whole; limits on the whole and on
one element."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refiner_source.directions.validation import Refused
from refiner_source.web.stream import CHUNK_BYTES, Body


def trickle(raw: bytes, sizes: list[int] | None = None):
    """A read() that gives `raw` a few bytes at a time (the sizes in turn), as a slow sender would."""
    stream = io.BytesIO(raw)
    steps = iter(sizes or [1])
    last = [1]

    def read(_size: int) -> bytes:
        last[0] = next(steps, last[0])
        return stream.read(last[0])

    return read


def elements(raw: bytes, limit: int = 1 << 30, element_limit: int = 1 << 20, sizes: list[int] | None = None):
    return list(Body(trickle(raw, sizes), limit).elements(element_limit))


def refusal(raw: bytes, **kwargs) -> Refused:
    with pytest.raises(Refused) as caught:
        elements(raw, **kwargs)
    return caught.value


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
spaces = st.text(alphabet=" \t\n\r", max_size=3)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(json_values, spaces, spaces), max_size=6),
    st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=5),
    st.booleans(),
)
def test_each_element_comes_with_its_exact_text_and_value_whatever_the_chunks(items, sizes, ascii):
    texts = [before + json.dumps(value, ensure_ascii=ascii, indent=None if ascii else 1) + after for value, before, after in items]
    raw = ("[" + ",".join(texts) + "]").encode()
    read = elements(raw, sizes=sizes)
    assert [e.index for e in read] == list(range(len(items)))
    assert [e.value for e in read] == json.loads(raw)
    assert [e.text for e in read] == [t.strip(" \t\n\r") for t in texts]


def test_a_number_cut_by_a_chunk_is_read_whole():
    assert [e.value for e in elements(b"[12345678, -0.25e-3 ,7]", sizes=[1])] == [12345678, -0.25e-3, 7]


def test_a_multi_byte_character_cut_by_a_chunk_is_read_whole():
    raw = '["Zoë 😀", {"é": "ü"}]'.encode()
    assert [e.value for e in elements(raw, sizes=[1])] == ["Zoë 😀", {"é": "ü"}]


def test_an_empty_array_has_no_elements():
    assert elements(b" [ \n ] ") == []


@pytest.mark.parametrize(
    "raw, where",
    [
        (b'[{"a": 1}, {"a": tru}]', "element 1"),
        (b'[{"a": 1},]', "element 1"),
        (b'[{"a": 1} {"a": 2}]', "after element 0"),
        (b'[{"a": 1}, {"a": 2}', "the end of the body"),
        (b'[{"a": 1}] x', "extra data"),
        (b'[{"a": 1}, {"a": "open', "element 1"),
        (b'[{"a": NaN}]', "NaN"),
        (b'[{"a": 1e999}]', "1e999"),
    ],
)
def test_what_is_not_json_is_refused_400_saying_where(raw, where):
    exc = refusal(raw)
    assert (exc.status, exc.code) == (400, "invalid_json") and where in exc.message


def test_what_came_before_a_break_is_read_first():
    body = Body(trickle(b'[{"a": 1}, {"a": 2}, {"a": oops}]', [3]), 1 << 20)
    read = []
    with pytest.raises(Refused):
        for element in body.elements(1 << 20):
            read.append(element.value)
    assert read == [{"a": 1}, {"a": 2}]


def test_a_body_that_is_not_utf8_is_refused_400():
    exc = refusal(b'[{"a": "\xff"}]')
    assert (exc.status, exc.code) == (400, "invalid_encoding")


def test_a_multi_byte_character_cut_off_at_the_end_is_not_utf8():
    exc = refusal('["é'.encode()[:-1])
    assert exc.code == "invalid_encoding"


def test_nesting_too_deep_to_parse_is_refused_422():
    exc = refusal(b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]")
    assert (exc.status, exc.code) == (422, "too_deep")


def test_an_element_over_its_limit_is_refused_413_naming_it():
    small = json.dumps({"a": "x" * 100}).encode()
    big = json.dumps({"a": "x" * 5000}).encode()
    exc = refusal(b"[" + small + b"," + big + b"]", element_limit=4096, sizes=[CHUNK_BYTES])
    assert (exc.status, exc.code) == (413, "event_too_large") and "Element 1" in exc.message and "4096" in exc.message


def test_an_element_of_multi_byte_characters_is_measured_in_bytes():
    raw = json.dumps(["é" * 3000], ensure_ascii=False).encode()  # 3,000 characters, 6,000 bytes
    assert refusal(raw, element_limit=4096).code == "event_too_large"
    assert elements(raw, element_limit=8192)[0].value == "é" * 3000


def test_a_body_over_its_limit_is_refused_413_even_without_a_length():
    raw = b"[" + b",".join([b'{"a": 1}'] * 1000) + b"]"
    exc = refusal(raw, limit=len(raw) - 1, sizes=[100])
    assert (exc.status, exc.code) == (413, "body_too_large")
    assert len(elements(raw, limit=len(raw), sizes=[100])) == 1000


def test_first_byte_looks_without_losing_anything():
    body = Body(trickle(b"  \n [1, 2]", [1]), 1 << 20)
    assert body.first_byte() == ord("[")
    assert [e.value for e in body.elements(100)] == [1, 2]
    assert Body(trickle(b" \t\n"), 100).first_byte() is None


def test_whole_gives_the_body_as_it_came_within_its_limit():
    raw = b' {"type": "identify"} '
    body = Body(trickle(raw, [2]), 1 << 20)
    assert body.first_byte() == ord("{") and body.whole(len(raw)) == raw
    with pytest.raises(Refused) as caught:
        Body(trickle(raw), 1 << 20).whole(len(raw) - 1)
    assert caught.value.status == 413


def test_every_chunk_from_the_sender_is_tapped_once_even_after_spooling():
    raw = b"[" + b",".join(json.dumps({"n": i, "pad": "p" * 50}).encode() for i in range(2000)) + b"]"
    seen = bytearray()
    body = Body(trickle(raw, [CHUNK_BYTES]), len(raw), tap=seen.extend)
    read = body.elements(1 << 20)
    first = next(read)
    body.spool_rest()
    assert bytes(seen) == raw  # the whole body, before any element but the first was used
    assert [first.value["n"], *(e.value["n"] for e in read)] == list(range(2000))
    assert body.size == len(raw)


def test_drain_reads_the_rest_of_the_body():
    stream = io.BytesIO(b"[1, 2, 3]" + b" " * 200_000)
    body = Body(stream.read, 1 << 20)
    body.first_byte()
    body.drain()
    assert stream.read() == b""
