"""Byte sizes: `parse_size` for --gpu-mem / --shard-size, `format_bytes` for people."""

from __future__ import annotations

import pytest

from mixtral_cli.errors import UserError
from mixtral_cli.sizes import format_bytes, parse_size


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * 1024**3),
    ("24gib", 24 * 1024**3),
    (" 1.5 GiB ", 1610612736),
    ("8000MiB", 8000 * 1024**2),
    ("512KiB", 524288),
    ("1TiB", 1024**4),
    ("16GB", 16_000_000_000),
    ("16G", 16_000_000_000),
    ("5gb", 5_000_000_000),
    ("250M", 250_000_000),
    ("2k", 2000),
    ("512B", 512),
    (".5GiB", 536870912),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("24", "has no unit"),  # 24 bytes was never what anybody meant
    ("0.5", "has no unit"),
    ("lots", "cannot read the size"),
    ("24 GiBs", "cannot read the size"),
    ("-1GiB", "cannot read the size"),
    ("", "cannot read the size"),
    ("1e9B", "cannot read the size"),
])
def test_parse_size_refuses(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_size(text)


def test_no_unit_hint_offers_the_likely_meaning():
    with pytest.raises(UserError) as err:
        parse_size("24")
    assert err.value.hint == "write it with one, like 24GiB or 24GB"


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1000, "1000 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (149_462, "145.96 KiB"),
    (24 * 1024**3, "24.00 GiB"), (3 * 1024**4, "3.00 TiB"),
])
def test_format_bytes_is_binary(n, text):
    assert format_bytes(n) == text
