import pytest

from accelprune.tables import format_table


def test_plain_table_aligns_names_left_and_numbers_right():
    text = format_table(("layer", "kept"), [("conv1", 3), ("layer1.0.conv2", 12)])
    assert text.splitlines() == [
        "layer           kept",
        "--------------  ----",
        "conv1              3",
        "layer1.0.conv2    12",
    ]


def test_markdown_table():
    text = format_table(("case", "time"), [("a", "1 s")], markdown=True)
    assert text.splitlines() == ["| case | time |", "| --- | ---: |", "| a | 1 s |"]


def test_bad_rows_and_alignment():
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        format_table(("a", "b"), [("x",)])
    with pytest.raises(ValueError, match="align"):
        format_table(("a", "b"), [("x", "y")], align="lc")
