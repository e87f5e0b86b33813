"""Tests for PII scrubbing of ad texts and records."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import pytest

from client.pii import ScrubConfig, scrub_records, scrub_text
from common.data import AdRecord
from common.e2e import load_e2e


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Questions? Email jane.doe+ads@example.co.uk today.", "Questions? Email [EMAIL] today."),
        ("Write to SALES@Shop-Example.com.", "Write to [EMAIL]."),
        ("Contact a_b.c%d@mail.example.org, or visit us.", "Contact [EMAIL], or visit us."),
    ],
)
def test_emails_replaced(text, expected):
    scrubbed, counts = scrub_text(text)
    assert scrubbed == expected
    assert counts == Counter(email=1)


@pytest.mark.parametrize(
    "text",
    [
        "Call (555) 123-4567 to book.",
        "Call 555-123-4567 to book.",
        "Call 555.123.4567 to book.",
        "Call 1-800-555-0199 to book.",
        "Call +1 555 123 4567 to book.",
        "Call 020 7946 0958 to book.",
        "Call +44 20 7946 0958 to book.",
        "Call +44 (0)20 7946 0958 to book.",
        "Call 07700 900123 to book.",
        "Call 07700900123 to book.",
        "Call 0800 123 4567 to book.",
        "Call +33 1 23 45 67 89 to book.",
        "Call +49 30 1234567 to book.",
        "Call +91 98765 43210 to book.",
        "Call +61 2 9374 4000 to book.",
    ],
)
def test_phones_replaced(text):
    scrubbed, counts = scrub_text(text)
    assert scrubbed == "Call [PHONE] to book."
    assert counts == Counter(phone=1)


def test_two_phones_in_one_run():
    scrubbed, counts = scrub_text("Call 555-123-4567 or 555-987-6543 2 times a day.")
    assert scrubbed == "Call [PHONE] or [PHONE] 2 times a day."
    assert counts["phone"] == 2


def test_phone_after_other_number():
    scrubbed, counts = scrub_text("Table 4 555-123-4567, 2 555-987-6543")
    assert scrubbed == "Table 4 [PHONE], 2 [PHONE]"
    assert counts["phone"] == 2


def test_long_digit_runs():
    # Inputs that make a backtracking regular expression run for hours.
    digits = "1" * 5000 + "x"
    assert scrub_text(digits) == (digits, Counter())
    spaced = "1 " * 3000 + "x"
    assert scrub_text(spaced) == (spaced, Counter())
    scrubbed, counts = scrub_text("555-123-4567 " * 2000)
    assert counts["phone"] == 2000
    assert scrubbed == "[PHONE] " * 2000


@pytest.mark.parametrize(
    "number",
    ["4111 1111 1111 1111", "4111-1111-1111-1111", "5500005555555559", "378282246310005",
     "6011 1111 1111 1117", "4222222222222"],
)  # fmt: skip
def test_luhn_valid_cards_replaced(number):
    scrubbed, counts = scrub_text(f"Paid with {number} yesterday.")
    assert scrubbed == "Paid with [CARD] yesterday."
    assert counts == Counter(card=1)


@pytest.mark.parametrize(
    "number",
    ["4111 1111 1111 1112", "1234-5678-9012-3456", "5500005555555558", "12345678901234567890"],
)
def test_random_digit_runs_left_alone(number):
    text = f"Order {number} shipped."
    assert scrub_text(text) == (text, Counter())


@pytest.mark.parametrize(
    "url",
    [
        "https://ads.example.com/click?campaign=spring&uid=8f3a2c",
        "https://track.example.net/c?USER=42&utm_source=mail",
        "http://example.com/open?email=jane%40example.com",
        "https://example.com/confirm?token=abc123def",
        "https://shop.example.com/item?id=98765",
        "https://example.com/r#sid=77aa",
        "https://example.com/users/12345/orders",
        "https://social.example.com/u/jane_doe",
        "www.example.com/@janedoe",
        "https://example.com/landing?gclid=EAIaIQobChMI",
    ],
)
def test_user_urls_replaced(url):
    scrubbed, counts = scrub_text(f"Details at {url}. Thanks!")
    assert scrubbed == "Details at [URL]. Thanks!"
    assert counts == Counter(url=1)


@pytest.mark.parametrize(
    "url",
    [
        "https://shop.example.com/products/blue-kettle",
        "https://shop.example.com/kettle?utm_source=newsletter&utm_medium=email",
        "https://example.com/search?q=coffee+shop&page=2",
        "https://example.com/users/",
        "www.example.co.uk/menu?id=",
        "https://example.com/about-us",
    ],
)
def test_plain_product_urls_left_alone(url):
    text = f"Details at {url}. Thanks!"
    assert scrub_text(text) == (text, Counter())


@pytest.mark.parametrize(
    "text",
    [
        "The Eagle is a coffee shop with prices £20-25 and a customer rating of 5 out of 5.",
        "Fitzbillies serves Italian food in the less than £20 price range near the river.",
        "Rated 3 out of 5 by 1,250 diners; open 10.30-23.00 since 1998.",
        "Loch Fyne is a kid friendly restaurant, prices are more than £30.",
        "Save 25% on orders over $50 until 2024-12-31. Was 1.500.000 views, now 2 000 000.",
        "Upgrade to 4K for $1,299.99 - only 12 left in stock!",
        "Our 3 for 2 offer ends 31/12/2024 at 11:59 pm.",
        "Near @ the river, the Wrestlers serves English food.",
    ],
)
def test_ordinary_ad_sentences_unchanged(text):
    assert scrub_text(text) == (text, Counter())


def test_config_toggles_and_replacement():
    text = "Email a@b.com or call 020 7946 0958, card 4111 1111 1111 1111, https://x.com/u/al"
    only_email = ScrubConfig(phones=False, payment_cards=False, user_urls=False)
    scrubbed, counts = scrub_text(text, only_email)
    assert scrubbed == (
        "Email [EMAIL] or call 020 7946 0958, card 4111 1111 1111 1111, https://x.com/u/al"
    )
    assert counts == Counter(email=1)

    redacted = ScrubConfig(replacement="<{kind}>")
    scrubbed, counts = scrub_text(text, redacted)
    assert scrubbed == "Email <EMAIL> or call <PHONE>, card <CARD>, <URL>"
    assert counts == Counter(email=1, phone=1, card=1, url=1)

    fixed = ScrubConfig(replacement="***")
    assert scrub_text("a@b.com", fixed)[0] == "***"


def test_email_inside_tracking_url_counted_once():
    scrubbed, counts = scrub_text("Go to https://t.example.com/o?email=jane@example.com now")
    assert scrubbed == "Go to [URL] now"
    assert counts == Counter(url=1)


def test_invalid_replacement_rejected():
    with pytest.raises(ValueError, match="replacement="):
        ScrubConfig(replacement="[{label}]")


def test_scrub_records_replaces_and_counts(caplog):
    records = [
        AdRecord(
            source="name[The Eagle], contact[jane@example.com]",
            text="Call 020 7946 0958 or email jane@example.com.",
            fields={"ref": "Call 020 7946 0958 or email jane@example.com.", "name": "The Eagle"},
            origin="ads.csv:2",
        ),
        AdRecord(source="name[Aromi]", text="Aromi has prices £20-25.", origin="ads.csv:3"),
    ]
    with caplog.at_level(logging.INFO, logger="client.pii"):
        scrubbed, counts = scrub_records(records)

    assert counts == {"url": 0, "email": 2, "card": 0, "phone": 1, "records_changed": 1}
    assert scrubbed[0].source == "name[The Eagle], contact[[EMAIL]]"
    assert scrubbed[0].text == "Call [PHONE] or email [EMAIL]."
    assert scrubbed[0].fields["ref"] == "Call [PHONE] or email [EMAIL]."
    assert scrubbed[0].fields["name"] == "The Eagle"
    assert scrubbed[0].origin == "ads.csv:2"
    assert scrubbed[1] is records[1]
    assert records[0].text.startswith("Call 020")  # the input is not modified

    log = caplog.text
    assert "changed 1 of 2 records" in log
    assert "2 email" in log
    assert "jane" not in log
    assert "7946" not in log


def test_scrub_records_rejects_non_dataclass():
    class Plain:
        source = "a"
        text = "b"

    with pytest.raises(TypeError, match="dataclass records"):
        scrub_records([Plain()])


def test_e2e_devset_unchanged(data_dir):
    records = load_e2e(data_dir / "e2e" / "devset.csv")
    scrubbed, counts = scrub_records(records)
    assert counts["records_changed"] == 0
    assert all(new is old for new, old in zip(scrubbed, records, strict=True))
    assert len(scrubbed) == 4672


def test_scrub_records_on_dataclass_copy():
    record = AdRecord(source="s", text="Mail me: x@y.org")
    (copy,), _ = scrub_records([record])
    assert dataclasses.replace(record, text="Mail me: [EMAIL]") == copy
