"""Who a person is: one rule turning an email address into the key that names them everywhere (pure).

The same rule keys the state's people and memberships, names managed contacts (their ids) and is the
`couchsync/lookup` view's (design_docs/contacts-lookup.map.js, the same steps in ES5):

1. only ASCII white space is trimmed (a no-break space is part of the address as written);
2. the address is put in Unicode NFC, so that one spelling composed and another decomposed (`josé`)
   are one person; except that the three characters NFC would turn into ASCII (the Kelvin sign
   U+212A into `K`, U+037E into `;`, U+1FEF into a backtick) are kept as written: through NFC, then
   lower-casing, the Kelvin sign would become `k` and merge a look-alike with the person it mimics;
3. the domain (after the last `@`) is put in its IDNA ASCII form label by label (`bücher.de` and
   `xn--bcher-kva.de` are one domain): ASCII letters lower-cased, then a label with any other
   character becomes `xn--` and its RFC 3492 Punycode (no other mapping, which ES5 could not repeat);
4. the local part has its ASCII letters lower-cased and nothing else: no Unicode case mapping, so
   `Kate@` written with the Kelvin sign (U+212A) is not `kate@`, whom it merely looks like.

Addresses made only of ASCII (nearly all) get the key the earlier rule (`strip().lower()`) gave them:
ids and keys written before this rule differ only for the others (see `legacy_key`).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

KEPT = re.compile("([\u037e\u1fef\u212a])")  # what NFC would make ASCII: kept, NFC around them
ASCII_SPACE = " \t\n\r\x0b\x0c"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def person_key(email: str) -> str:
    """The key of the person an email address names (see the module's rule)."""
    if email.isascii():
        # Nearly every address: NFC and IDNA leave ASCII as it is, so the rule is lower-casing. A hot path:
        # a bootstrap asks each person's membership of every group, so this runs people x groups times.
        return email.strip(ASCII_SPACE).lower()
    return _non_ascii_key(email)


@lru_cache(maxsize=4096)
def _non_ascii_key(email: str) -> str:
    text = nfc(email.strip(ASCII_SPACE))
    local, at, domain = text.rpartition("@")
    if not at:
        return text.translate(_ASCII_LOWER)
    return f"{local.translate(_ASCII_LOWER)}@{ascii_domain(domain)}"


def nfc(text: str) -> str:
    """NFC, but for the characters it would make ASCII: kept, each piece between them normalized alone."""
    return "".join(part if KEPT.fullmatch(part) else unicodedata.normalize("NFC", part) for part in KEPT.split(text))


def ascii_domain(domain: str) -> str:
    """A domain's IDNA ASCII form, lower-case: each label with a non-ASCII character as `xn--` Punycode."""
    return ".".join(_ascii_label(label.translate(_ASCII_LOWER)) for label in domain.split("."))


def _ascii_label(label: str) -> str:
    if label.isascii():
        return label
    return "xn--" + label.encode("punycode").decode("ascii")


def legacy_key(email: str) -> str:
    """The key the rule before this one gave (Unicode `strip().lower()`): what older documents carry."""
    return email.strip().lower()
