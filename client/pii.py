"""PII scrubbing of ad records before local training: emails, phones, cards, user URLs.

Each detector favours precision on ad copy: prices such as "£20-25", ratings such as
"5 out of 5", years, product URLs and digit runs that fail the checks below stay as they
are. Detection is pattern-based, so it reduces the PII that reaches the model but does not
prove its absence; differential privacy remains the formal protection.

- Emails: ``local@domain.tld`` with an alphabetic top-level domain.
- Phones: international numbers starting with ``+``, with 8 to 15 digits (the E.164
  maximum). National numbers need 10 or 11 digits in groups of at least 3 digits after
  the first, as in US ``(555) 123-4567`` and ``1-800-555-0199`` or UK ``020 7946 0958``
  and ``07700 900123``. Without separators, only numbers that start with the trunk
  prefix ``0`` count.
- Payment cards: 13 to 19 digits, optionally grouped with spaces or dashes, that pass the
  Luhn checksum (ISO/IEC 7812). Random digit strings fail it 9 times in 10.
- URLs with user identifiers: ``http(s)://`` or ``www.`` URLs whose query or fragment sets
  an identifier parameter (``uid=``, ``user=``, ``email=``, ``token=``, ``id=`` and
  others, with a value), or whose path names a user (``/users/12345``, ``/u/name``,
  ``/@name``). The whole URL is replaced, because other parameters of such a URL often
  carry tracking values too.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

logger = logging.getLogger(__name__)

KINDS = ("url", "email", "card", "phone")  # the order in which detectors run

DEFAULT_URL_PARAMS = frozenset(
    {
        "uid", "user", "userid", "user_id", "username", "email", "mail", "token",
        "access_token", "auth_token", "id", "customer_id", "member_id", "subscriber_id",
        "session_id", "sessionid", "sid", "fbclid", "gclid", "msclkid",
    }
)  # fmt: skip
DEFAULT_URL_PATHS = frozenset(
    {
        "u", "user", "users", "profile", "profiles", "member", "members", "customer",
        "customers", "account", "accounts",
    }
)  # fmt: skip

R = TypeVar("R")


@dataclass(frozen=True)
class ScrubConfig:
    """Detector switches and replacement text for PII scrubbing.

    Parameters
    ----------
    emails, phones, payment_cards, user_urls : bool, default True
        Turn each detector on or off.
    replacement : str, default "[{kind}]"
        Text that replaces each match. ``{kind}`` becomes ``EMAIL``, ``PHONE``, ``CARD``
        or ``URL``; a string without ``{kind}`` is used as it is.
    url_identifier_params : frozenset of str
        Query or fragment parameter names (case-insensitive) whose non-empty value marks
        a URL as carrying a user identifier.
    url_identifier_paths : frozenset of str
        Path segments (case-insensitive) whose next segment is a user identifier.
    """

    emails: bool = True
    phones: bool = True
    payment_cards: bool = True
    user_urls: bool = True
    replacement: str = "[{kind}]"
    url_identifier_params: frozenset[str] = DEFAULT_URL_PARAMS
    url_identifier_paths: frozenset[str] = DEFAULT_URL_PATHS

    def __post_init__(self) -> None:
        try:
            self.replacement.format(kind="EMAIL")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"replacement={self.replacement!r} is not a valid format string: the only "
                "field allowed is {kind}, and literal braces must be doubled ({{ }})"
            ) from None
        for name in ("url_identifier_params", "url_identifier_paths"):
            values = getattr(self, name)
            object.__setattr__(self, name, frozenset(value.lower() for value in values))

    def replacement_for(self, kind: str) -> str:
        """Return the text that replaces a match of ``kind``."""
        return self.replacement.format(kind=kind.upper())


# --- detectors ---------------------------------------------------------------------------

_URL = re.compile(r"(?:\bhttps?://|\bwww\.)[^\s<>\"']+", re.IGNORECASE)
_URL_TRAILING = ".,;:!?'\""

_EMAIL = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9._%+-]+@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])"
)

# 13 to 19 digits, single spaces or dashes allowed between digits.
_CARD = re.compile(r"(?<![\w+.,-])\d(?:[ -]?\d){12,18}(?![\w]|[.,]\d)")

# Digits and parenthesized groups, with at most one space, dot or dash between them and
# an optional leading "+". Not preceded by a word character, a currency sign or a
# character that makes the digits part of a path, decimal or range. Each repetition takes
# one digit or one parenthesized group, so a string parses in one way only and matching
# stays linear in its length (a "\d+" group here would backtrack exponentially).
_PHONE_UNIT = r"(?:\(\d{1,5}\)|\d)"
_PHONE = re.compile(rf"(?<![\w+/.,£$€¥-])\+?{_PHONE_UNIT}(?:[ .-]?{_PHONE_UNIT})*(?![\w]|[.,-]\d)")
_GROUP_IN_PHONE = re.compile(r"\(\d+\)|\d+")
# International numbers have at most 15 digits, written in no more than 8 groups in
# practice. Bounding the run length keeps the phone search linear in the number of groups.
_MAX_PHONE_GROUPS = 8


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _url_has_user_id(url: str, config: ScrubConfig) -> bool:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    for part in (parts.query, parts.fragment):
        for key, value in parse_qsl(part, keep_blank_values=False):
            if key.lower() in config.url_identifier_params and value.strip():
                return True
    segments = [segment for segment in parts.path.split("/") if segment]
    for position, segment in enumerate(segments):
        if segment.startswith("@") and len(segment) > 1:
            return True
        if segment.lower() in config.url_identifier_paths and position + 1 < len(segments):
            return True
    return False


def _is_phone(groups: list[str], has_plus: bool) -> bool:
    bare = [group.strip("()") for group in groups]
    num_digits = sum(len(group) for group in bare)
    if has_plus:
        return 8 <= num_digits <= 15
    if num_digits not in (10, 11) or len(groups) > 4:
        return False
    if len(groups) == 1:
        # Without separators only a national number with trunk prefix 0 is distinctive.
        return bare[0].startswith("0")
    first, rest = bare[0], bare[1:]
    if any(len(group) < 3 for group in rest):
        return False
    if len(first) == 1 and first != "1":  # a lone leading digit is only the US prefix 1
        return False
    # "1.500.000.000" or "1 500 000 000" are thousands separators, not a phone number.
    return not (len(first) <= 3 and all(len(group) == 3 for group in rest))


def _phone_spans(groups: list[str], has_plus: bool) -> list[range]:
    """Return non-overlapping runs of ``groups`` that form phone numbers, left to right.

    At each group the longest run that forms a phone number is taken, so that
    "555-123-4567 or 555-987-6543" yields two numbers and "Table 4 555-123-4567" leaves
    the table number alone. The scan is linear in the number of groups.
    """
    spans = []
    start = 0
    while start < len(groups):
        found = None
        for end in range(min(start + _MAX_PHONE_GROUPS, len(groups)), start, -1):
            if _is_phone(groups[start:end], has_plus and start == 0):
                found = range(start, end)
                break
        if found is None:
            start += 1
        else:
            spans.append(found)
            start = found.stop
    return spans


def _replace_phones(candidate: str, label: str, counts: Counter[str]) -> str:
    matches = list(_GROUP_IN_PHONE.finditer(candidate))
    has_plus = candidate.startswith("+")
    spans = _phone_spans([match.group() for match in matches], has_plus)
    pieces = []
    position = 0
    for span in spans:
        # A run that starts at the first group also takes the leading "+".
        begin = 0 if span.start == 0 else matches[span.start].start()
        pieces.append(candidate[position:begin])
        pieces.append(label)
        position = matches[span.stop - 1].end()
        counts["phone"] += 1
    pieces.append(candidate[position:])
    return "".join(pieces)


def scrub_text(text: str, config: ScrubConfig | None = None) -> tuple[str, Counter[str]]:
    """Replace PII in ``text`` and count the replacements by kind.

    Parameters
    ----------
    text : str
        Any text; it is never logged.
    config : ScrubConfig or None, default None
        Detectors and replacement; ``None`` uses ``ScrubConfig()``.

    Returns
    -------
    scrubbed : str
        ``text`` with each match replaced.
    counts : Counter
        Number of replacements per kind (``"url"``, ``"email"``, ``"card"``,
        ``"phone"``); kinds without matches are absent.
    """
    config = config if config is not None else ScrubConfig()
    counts: Counter[str] = Counter()

    # URLs go first, because a tracking URL can contain an email or a long digit run.
    if config.user_urls:

        def replace_url(match: re.Match[str]) -> str:
            url = match.group().rstrip(_URL_TRAILING)
            if url.endswith(")") and url.count(")") > url.count("("):
                url = url[:-1]
            tail = match.group()[len(url) :]
            if not _url_has_user_id(url, config):
                return match.group()
            counts["url"] += 1
            return config.replacement_for("url") + tail

        text = _URL.sub(replace_url, text)

    if config.emails:

        def replace_email(match: re.Match[str]) -> str:
            counts["email"] += 1
            return config.replacement_for("email")

        text = _EMAIL.sub(replace_email, text)

    # Cards before phones: a grouped card number also looks like a long phone number.
    if config.payment_cards:

        def replace_card(match: re.Match[str]) -> str:
            digits = re.sub(r"\D", "", match.group())
            if not _luhn_valid(digits):
                return match.group()
            counts["card"] += 1
            return config.replacement_for("card")

        text = _CARD.sub(replace_card, text)

    if config.phones:
        label = config.replacement_for("phone")
        text = _PHONE.sub(lambda match: _replace_phones(match.group(), label, counts), text)

    return text, counts


def scrub_records(
    records: Iterable[R], config: ScrubConfig | None = None
) -> tuple[list[R], dict[str, int]]:
    """Scrub the ``source`` and ``text`` of each record and return new records and counts.

    Records must be dataclass instances with ``source`` and ``text`` string attributes,
    such as ``common.data.AdRecord``. Changed records are copies made with
    ``dataclasses.replace``, and unchanged ones are returned as they are. String values in a
    ``fields`` mapping, which hold the raw columns, are scrubbed with the same rules so
    that no copy of the PII stays in the record. Their replacements are not counted again,
    because these columns normally repeat the source and the text.

    Returns
    -------
    records : list
        Scrubbed records, in input order.
    counts : dict of str to int
        Replacements per kind in ``KINDS`` (zero included) and ``records_changed``.
    """
    config = config if config is not None else ScrubConfig()
    totals: Counter[str] = Counter()
    scrubbed: list[R] = []
    num_changed = 0
    num_records = 0
    for record in records:
        num_records += 1
        if not dataclasses.is_dataclass(record) or isinstance(record, type):
            raise TypeError(
                f"scrub_records expects dataclass records with source and text (such as "
                f"AdRecord), got {type(record).__name__}"
            )
        source, source_counts = scrub_text(record.source, config)  # type: ignore[attr-defined]
        text, text_counts = scrub_text(record.text, config)  # type: ignore[attr-defined]
        totals.update(source_counts)
        totals.update(text_counts)
        changes: dict[str, Any] = {}
        if source != record.source:  # type: ignore[attr-defined]
            changes["source"] = source
        if text != record.text:  # type: ignore[attr-defined]
            changes["text"] = text
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            new_fields = {
                key: scrub_text(value, config)[0] if isinstance(value, str) else value
                for key, value in fields.items()
            }
            if new_fields != dict(fields):
                changes["fields"] = new_fields
        if changes:
            num_changed += 1
            scrubbed.append(dataclasses.replace(record, **changes))  # type: ignore[type-var]
        else:
            scrubbed.append(record)

    counts = {kind: totals[kind] for kind in KINDS}
    counts["records_changed"] = num_changed
    logger.info(
        "scrub_records: changed %d of %d records (%s)",
        num_changed,
        num_records,
        ", ".join(f"{counts[kind]} {kind}" for kind in KINDS),
    )
    return scrubbed, counts
