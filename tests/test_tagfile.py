"""Slice-O-Matic .tag files: hand-made headers and their edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.tagfile import TagFormatError, parse_header, read_tag, read_tag_mask, write_tag

PIXELS = bytes([0, 1, 7, 5, 2, 0, 1, 1, 7, 7, 5, 0])  # x=4, y=3: rows top to bottom


def _tag(tmp_path: Path, header: bytes, data: bytes = PIXELS) -> Path:
    path = tmp_path / "slice.tag"
    path.write_bytes(header + data)
    return path


def test_reads_rows_top_to_bottom(tmp_path: Path) -> None:
    path = _tag(tmp_path, b"x: 4 y: 3 z: 1 type:BYTE org_x: -1.5 inc_x: 0.8\x0c")
    tag = read_tag(path)
    assert tag.array.shape == (3, 4)
    assert tag.array[0].tolist() == [0, 1, 7, 5]  # first four bytes = top row
    assert tag.array[2].tolist() == [7, 7, 5, 0]
    assert tag.header["inc_x"] == "0.8" and tag.header["type"] == "BYTE"
    assert tag.header_length == len(b"x: 4 y: 3 z: 1 type:BYTE org_x: -1.5 inc_x: 0.8\x0c")


def test_header_on_several_lines_with_padding_before_form_feed(tmp_path: Path) -> None:
    header = b"x:4\ny:3\r\nz:1\ntype: BYTE\n" + b" " * 300 + b"\x0c"
    np.testing.assert_array_equal(
        read_tag_mask(_tag(tmp_path, header)), np.frombuffer(PIXELS, np.uint8).reshape(3, 4)
    )


def test_pixel_value_twelve_after_header_is_data(tmp_path: Path) -> None:
    data = bytes([12] * 12)  # 0x0C inside the pixel data must not confuse the reader
    assert read_tag_mask(_tag(tmp_path, b"x:4 y:3 z:1 type:BYTE\x0c", data)).tolist() == [[12] * 4] * 3


def test_missing_form_feed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TagFormatError, match="0x0C"):
        read_tag(_tag(tmp_path, b"x:4 y:3 z:1 type:BYTE ", bytes(12)))


def test_truncated_data_is_refused_with_numbers(tmp_path: Path) -> None:
    with pytest.raises(TagFormatError, match=r"short \(truncated\?\)"):
        read_tag(_tag(tmp_path, b"x:4 y:3 z:1 type:BYTE\x0c", PIXELS[:-3]))


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TagFormatError, match=r"3 bytes too long"):
        read_tag(_tag(tmp_path, b"x:4 y:3 z:1 type:BYTE\x0c", PIXELS + b"abc"))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"y:3 z:1 type:BYTE\x0c", "no 'x:'"),
        (b"x:4 z:1 type:BYTE\x0c", "no 'y:'"),
        (b"x:4 y:3 z:1 type:SHORT\x0c", "type:BYTE"),
        (b"x:four y:3\x0c", "not a whole number"),
    ],
)
def test_bad_headers_are_refused(tmp_path: Path, header: bytes, message: str) -> None:
    with pytest.raises(TagFormatError, match=message):
        read_tag(_tag(tmp_path, header))


def test_volume_is_not_a_slice(tmp_path: Path) -> None:
    path = _tag(tmp_path, b"x:2 y:3 z:2 type:BYTE\x0c")  # 12 bytes = 2 x 3 x 2
    assert read_tag(path).array.shape == (2, 3, 2)
    with pytest.raises(TagFormatError, match="z:1"):
        read_tag_mask(path)


def test_write_then_read_round_trip_and_header_looks_like_slice_o_matic(tmp_path: Path) -> None:
    mask = np.random.default_rng(0).choice([0, 1, 2, 5, 7], size=(5, 6)).astype(np.uint8)
    path = write_tag(tmp_path / "m.tag", mask, spacing_mm=(0.7, 0.8))
    blob = path.read_bytes()
    end = blob.index(b"\x0c")
    assert end + 1 == 512 and len(blob) == 512 + 30
    header = parse_header(blob[:end].decode("ascii"))
    assert (header["x"], header["y"], header["z"], header["type"]) == ("6", "5", "1", "BYTE")
    assert (header["inc_x"], header["inc_y"]) == ("0.8", "0.7")
    np.testing.assert_array_equal(read_tag_mask(path), mask)


def test_write_refuses_values_above_255(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"0\.\.255"):
        write_tag(tmp_path / "m.tag", np.array([[0, 256]]))
