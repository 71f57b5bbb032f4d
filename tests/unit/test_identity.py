"""One identity rule for people: the Python rule and the lookup view's JavaScript rule give equal keys."""

from __future__ import annotations

import json
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from couchsync import design_docs
from couchsync.design_docs import LOOKUP_SOURCE
from couchsync.documents import managed_contact_id
from couchsync.identity import _non_ascii_key, legacy_key, person_key

RUNNER = Path(__file__).with_name("run_lookup_map.js")
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def view():
    """The lookup view's map function in Node.js: `view(doc)` → the keys it emits."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js runs the view's JavaScript in the unit tests")
    source = (ROOT / "design_docs" / LOOKUP_SOURCE).read_text(encoding="utf-8")
    process = subprocess.Popen([node, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               encoding="utf-8")
    assert process.stdin and process.stdout
    process.stdin.write(json.dumps(source) + "\n")

    def run(doc: dict) -> list:
        assert process.stdin and process.stdout
        process.stdin.write(json.dumps(doc) + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())
    yield run
    process.stdin.close()
    process.stdout.close()
    process.wait(timeout=10)


def js_key(view, address: str) -> str:
    keys = view({"email": [{"address": address}]})
    return keys[0][1] if keys else ""


# Characters Python's Unicode (unicodedata.unidata_version) knows: Node's may be newer, and NFC is only
# stable for assigned characters. Surrogates cannot be in a JSON document CouchDB stores.
KNOWN = st.characters(exclude_categories=("Cs", "Cn"))
LOCAL = st.text(st.one_of(KNOWN, st.sampled_from("AKZakz.+_-\u212a\u037e\u1fef\u0301\u00e9 \t\u00a0")), max_size=12)
LABEL = st.text(st.one_of(KNOWN, st.sampled_from("ABCxyz-\u00fc\u00dc\u0308\u212a")), min_size=0, max_size=10)
ADDRESS = st.builds(lambda space, local, labels, end: f"{space}{local}@{'.'.join(labels)}{end}",
                    st.sampled_from(["", " ", "\t", "\u00a0"]), LOCAL, st.lists(LABEL, min_size=1, max_size=3),
                    st.sampled_from(["", " ", "\n", "\u2003"]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(ADDRESS, st.text(KNOWN, max_size=20)))
def test_the_python_and_javascript_rules_give_the_same_key(view, address):
    expected = person_key(address)
    assert js_key(view, address) == expected
    assert person_key(expected) == expected  # a key is its own key: keys are compared with keys


def test_the_kelvin_sign_look_alike_is_another_person(view):
    kelvin = "\u212aate@x.com"
    assert person_key(kelvin) != person_key("Kate@x.com") == "kate@x.com"
    assert js_key(view, kelvin) == person_key(kelvin)
    assert legacy_key(kelvin) == "kate@x.com"  # what merged them before


@pytest.mark.parametrize("one, other", [
    ("jos\u00e9@x.com", unicodedata.normalize("NFD", "jos\u00e9@x.com")),
    ("bob@b\u00fccher.de", "bob@xn--bcher-kva.de"),
    ("Bob@B\u00fccher.DE", "bob@XN--BCHER-KVA.de"),
    (" alice@acme.com\t", "ALICE@acme.com"),
])
def test_spellings_of_one_address_are_one_person(view, one, other):
    assert person_key(one) == person_key(other) == js_key(view, one) == js_key(view, other)
    assert managed_contact_id("acme", one) == managed_contact_id("acme", other)


def test_a_non_ascii_space_or_case_is_part_of_the_address(view):
    assert person_key("\u00a0bob@x.com") != person_key("bob@x.com")
    assert person_key("\u00c9ric@x.com") != person_key("\u00e9ric@x.com")


def test_ascii_addresses_keep_the_key_and_contact_id_the_earlier_rule_gave():
    for address in ["Alice@Acme.COM", " bob@acme.com ", "m0001@acme.com"]:
        assert person_key(address) == legacy_key(address)


@given(st.text(st.characters(max_codepoint=127), max_size=30))
def test_the_ascii_shortcut_gives_the_key_of_the_whole_rule(address):
    # Every step of the rule runs for ASCII too (`_non_ascii_key`); the shortcut only skips what changes nothing.
    assert person_key(address) == _non_ascii_key(address)


def test_the_view_deployed_is_the_one_tested():
    assert design_docs.load().lookup["views"]["lookup"]["map"] == (
        ROOT / "design_docs" / LOOKUP_SOURCE).read_text(encoding="utf-8").strip()
