"""The API key kept out of a server's error text: as sent, JSON-escaped, and any bearer token."""
from __future__ import annotations

import json

from udfs.caption.redaction import redact, secret_forms, without_secrets


def test_the_key_in_every_form_and_any_bearer_token_are_removed():
    key = 'sk-a"b\\c/é'
    body = (f"denied for Bearer {key}; " + json.dumps({"auth": f"Bearer {key}"}) + " "
            + json.dumps({"auth": key}, ensure_ascii=False) + " other: bearer abc.DEF-1~+/=")
    shown = redact(body, secret_forms({"Authorization": f"Bearer {key}"}))
    assert shown == ('denied for Bearer [redacted]; {"auth": "Bearer [redacted]"} {"auth": "[redacted]"} '
                     "other: Bearer [redacted]")
    assert redact(shown, secret_forms({"Authorization": f"Bearer {key}"})) == shown
    assert secret_forms({"Content-Type": "application/json"}) == ()
    assert redact("HTTP 500: no key here", ()) == "HTTP 500: no key here"


def test_a_slash_escaped_key_goes_and_a_caption_keeps_its_prose():
    key = "sk-ab/cd"
    forms = secret_forms({"Authorization": f"Bearer {key}"})
    assert redact('{"error": "bad key sk-ab\\/cd"}', forms) == '{"error": "bad key [redacted]"}'
    # A caption body: the exact key goes, words that merely follow "bearer" stay.
    caption = f"A flag bearer holding a red banner; the ring bearer walks. {key}"
    assert without_secrets(caption, forms) == "A flag bearer holding a red banner; the ring bearer walks. [redacted]"
