"""Stop strings: the text ends right before the first one, and while streaming no delta ever
shows a piece of a stop string that is later cut (nor half a UTF-8 character)."""
from teegpu.tee.text_stream import TextStream


def chars(ids: list[int]) -> str:
    """A decoder whose tokens are single characters (code points)."""
    return "".join(map(chr, ids))


def stream_all(text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    s, ids, deltas, stopped = TextStream(chars, stop), [], [], False
    for ch in text:
        ids.append(ord(ch))
        delta, stopped = s.push(ids)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(s.finish(ids))
    assert "".join(deltas) == s.text
    return deltas, stopped


def test_text_ends_before_the_stop_string():
    deltas, stopped = stream_all("Hello world. Bye", ("world",))
    assert stopped and "".join(deltas) == "Hello "


def test_a_possible_start_of_a_stop_string_is_held_back():
    deltas, _ = stream_all("abcXYd", ("XYZ",))
    assert deltas[3] == "" and deltas[4] == ""  # "X", "XY" might begin XYZ
    assert "".join(deltas) == "abcXYd"  # released once it cannot


def test_earliest_of_several_stop_strings_wins():
    deltas, stopped = stream_all("one two three", ("three", "two"))
    assert stopped and "".join(deltas) == "one "


def test_split_utf8_character_waits_for_its_rest():
    s = TextStream(lambda ids: "ab\ufffd" if len(ids) == 1 else "abé")
    assert s.push([1]) == ("", False) and s.push([1, 2]) == ("abé", False)
