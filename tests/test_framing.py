"""The MLLP frame decoder, fed the byte patterns real senders produce."""

from carehub.hl7.framing import BrokenFrame, Frame, FrameDecoder, OversizeFrame, encode_frame

MSG = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|1\r"


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events


def test_one_byte_at_a_time() -> None:
    data = encode_frame(MSG)
    events = feed_all(FrameDecoder(1 << 20), [data[i : i + 1] for i in range(len(data))])
    assert events == [Frame(MSG)]


def test_several_frames_in_one_read_come_out_in_order() -> None:
    data = b"".join(encode_frame(MSG.replace(b"|1|P", f"|{i}|P".encode())) for i in range(5))
    events = FrameDecoder(1 << 20).feed(data)
    assert [e.payload.split(b"|")[9] for e in events] == [b"0", b"1", b"2", b"3", b"4"]


def test_stray_bytes_and_newlines_between_frames_are_skipped_and_counted() -> None:
    decoder = FrameDecoder(1 << 20)
    events = decoder.feed(b"junk\r\n" + encode_frame(MSG) + b"\r\n\n" + encode_frame(MSG))
    assert events == [Frame(MSG), Frame(MSG)]
    assert decoder.stray_bytes == len(b"junk\r\n") + 3


def test_end_block_split_from_its_carriage_return() -> None:
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(b"\x0b" + MSG + b"\x1c") == []
    assert decoder.feed(b"\r") == [Frame(MSG)]
    assert not decoder.mid_frame


def test_end_block_without_carriage_return_is_accepted() -> None:
    events = FrameDecoder(1 << 20).feed(b"\x0b" + MSG + b"\x1c\x0b" + MSG + b"\x1c\r")
    assert events == [Frame(MSG), Frame(MSG)]


def test_start_block_inside_a_frame_breaks_the_first_and_keeps_the_second() -> None:
    events = FrameDecoder(1 << 20).feed(b"\x0b" + MSG[:20] + encode_frame(MSG))
    assert isinstance(events[0], BrokenFrame) and events[0].head == MSG[:20]
    assert events[1] == Frame(MSG)


def test_oversize_frame_is_drained_without_buffering_and_the_next_frame_survives() -> None:
    decoder = FrameDecoder(2048)
    big = MSG + b"OBX|1|ED|||" + b"A" * 10_000 + b"\r"
    chunks = [b"\x0b" + big[:1000]] + [big[i : i + 1000] for i in range(1000, len(big), 1000)]
    events = feed_all(decoder, [*chunks, b"\x1c\r", encode_frame(MSG)])
    assert isinstance(events[0], OversizeFrame)
    assert events[0].size == len(big)
    assert events[0].head.startswith(b"MSH|")
    assert events[1] == Frame(MSG)
    assert decoder.pending_bytes == 0


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    assert FrameDecoder(len(MSG)).feed(encode_frame(MSG)) == [Frame(MSG)]
    assert isinstance(FrameDecoder(len(MSG) - 1).feed(encode_frame(MSG))[0], OversizeFrame)


def test_mid_frame_is_reported_for_a_dropped_peer() -> None:
    decoder = FrameDecoder(1 << 20)
    decoder.feed(b"\x0b" + MSG[:10])
    assert decoder.mid_frame and decoder.pending_bytes == 10


def test_an_end_block_inside_the_message_is_a_byte_of_it_not_its_end() -> None:
    """0x1C followed by anything but CR, LF or the next VT is data: the frame goes on to the
    real end, so the message is never cut short (intake refuses the byte, but has it all)."""
    inside = MSG.replace(b"PID|1", b"PID|1|\x1cTAIL|")
    data = encode_frame(inside) + encode_frame(MSG)
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        assert feed_all(FrameDecoder(1 << 20), chunks) == [Frame(inside), Frame(MSG)]


def test_an_end_block_followed_by_a_line_feed_ends_the_frame() -> None:
    events = FrameDecoder(1 << 20).feed(b"\x0b" + MSG + b"\x1c\n" + encode_frame(MSG))
    assert events == [Frame(MSG), Frame(MSG)]


def test_a_start_block_inside_the_message_is_a_byte_of_it_unless_an_msh_follows() -> None:
    """One frame, one answer: a VT in the content does not split the frame into two."""
    inside = MSG.replace(b"PID|1", b"PID|1|\x0bX")
    data = encode_frame(inside) + encode_frame(MSG)
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        assert feed_all(FrameDecoder(1 << 20), chunks) == [Frame(inside), Frame(MSG)]
    with_bom = b"\x0b" + MSG[:20] + b"\x0b\xef\xbb\xbf" + MSG + b"\x1c\r"
    events = FrameDecoder(1 << 20).feed(with_bom)
    assert isinstance(events[0], BrokenFrame) and events[1] == Frame(b"\xef\xbb\xbf" + MSG)


def test_a_start_block_at_the_end_of_a_read_waits_to_see_what_follows() -> None:
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(b"\x0b" + MSG[:20] + b"\x0bMS") == []
    events = decoder.feed(b"H" + MSG[3:] + b"\x1c\r")
    assert isinstance(events[0], BrokenFrame) and events[1] == Frame(MSG)


def test_an_end_block_with_nothing_after_it_ends_the_frame_when_asked() -> None:
    """A sender that leaves out the CR and waits: the listener ends the frame after a quiet."""
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(b"\x0b" + MSG + b"\x1c") == []
    assert decoder.awaiting_end
    assert decoder.end_frame_now() == [Frame(MSG)]
    assert not decoder.mid_frame and not decoder.awaiting_end
    assert decoder.end_frame_now() == []
