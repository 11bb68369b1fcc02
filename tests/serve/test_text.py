"""Incremental detokenisation with OpenAI stop strings: what is sent is always final text."""
from __future__ import annotations

from deltakit.serve._text import TextStream
from tests.serve.helpers import tiny_lm

_, TOK = tiny_lm()


def _ids(text: str) -> list[int]:
    return list(TOK(text)["input_ids"])


def test_pieces_add_up_to_the_decoded_text():
    s = TextStream(TOK)
    pieces = [s.push(t) for t in _ids("w1 w2 w3 w4")] + [s.finish()]
    assert pieces == ["w1", " w2", " w3", " w4", ""]


def test_a_stop_string_ends_the_text_before_it_and_its_prefix_is_held_back():
    s = TextStream(TOK, stop=["w3 w4", "zzz"])
    got = [s.push(t) for t in _ids("w1 w2 w3")]
    assert got == ["w1", " w2", " "] and not s.stopped      # "w3" could start the stop string: held
    assert s.push(_ids("w4")[0]) == "" and s.stopped
    assert s.finish() == "" and s.sent == "w1 w2 "


def test_a_held_prefix_that_does_not_become_the_stop_string_is_sent():
    s = TextStream(TOK, stop=["w3 w4"])
    got = [s.push(t) for t in _ids("w1 w3 w5")] + [s.finish()]
    assert "".join(got) == "w1 w3 w5" and got[1] == " " and not s.stopped
