"""Dead-letter bodies as `dlq list --show-body` shows them: secret fields masked in any body."""

import json

import pytest

from couchsync.dead_letters import SHOWN_BODY, masked_body
from couchsync.events import SECRET_FIELDS

SECRETS = {"hash": "h4shS3cret", "publicKey": "pubK3ySecret", "privateKey": "privK3ySecret", "key": "k3ySecret",
           "iterations": 987654}
USER = {"twakeId": "t1", "domain": "erin.acme.twake.app", "internalEmail": "erin@acme.com", **SECRETS}


@pytest.mark.parametrize("body", [
    json.dumps(USER).encode(),
    json.dumps(USER).encode()[:-1] + b",}",  # a trailing comma: not JSON
    json.dumps([USER, {"nested": USER}]).encode(),  # an array, and deeper
    json.dumps(USER, indent=2).encode()[:-40],  # cut short
    b"\xff" + json.dumps(USER).encode(),  # not UTF-8
    b"hash=h4shS3cret key: 'k3ySecret' iterations=987654 publicKey=pubK3ySecret privateKey: privK3ySecret",
    b'{"\\u0070rivateKey": "privK3ySecret", "hash": "h4shS3cret", "key": "k3ySecret", "iterations": 987654,'
    b' "publicKey": "pubK3ySecret",',
    json.dumps(json.dumps(USER)).encode(),  # a JSON string holding the JSON object
], ids=["object", "trailing-comma", "array", "cut-short", "not-utf8", "plain-text", "escaped-name", "encoded-twice"])
def test_secret_fields_are_masked_in_any_body_parsed_or_not(body):
    shown = masked_body(body)
    for value in ("h4shS3cret", "pubK3ySecret", "privK3ySecret", "k3ySecret", "987654"):
        assert value not in shown


def test_a_body_without_secrets_is_shown_as_it_is_cut_to_the_bound():
    assert masked_body(b'{"id": "g", "members": []}') == '{"id": "g", "members": []}'
    assert masked_body(b"x" * 100000) == "x" * SHOWN_BODY
    assert SECRET_FIELDS == {"hash", "publicKey", "privateKey", "key", "iterations"}
