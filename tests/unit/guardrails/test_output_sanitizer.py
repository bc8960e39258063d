"""Output sanitization: links and images to domains not allowed lose their URL, HTML and terminal escapes
go, and a stream cut anywhere comes out the same as the whole text."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_guardrails.sanitize import NEUTRALIZED_URL, Sanitizer

ANSWER = (
    "See ![x](https://evil.com/p.png?d=secret) and [docs](https://docs.example.com/a) and "
    "[bad](http://evil.org) <script>alert(1)</script><b>bold</b> \x1b[31mred\x1b[0m arr[0] is fine!\n"
    "[ref]: http://evil.org/y\n<https://evil.org> ok ![i](http://x.y/a.png) [rel](/docs/page)"
)


def test_links_to_other_domains_are_neutralized_and_allowed_ones_kept() -> None:
    decision = Sanitizer(["example.com"], strip_html=False).check(ANSWER)
    assert decision.action == "redact" and decision.text is not None
    text = decision.text
    assert "evil" not in text and "x.y" not in text
    assert "[docs](https://docs.example.com/a)" in text and "[rel](/docs/page)" in text
    assert f"[bad]({NEUTRALIZED_URL})" in text
    assert "See x and" in text  # an image keeps its alt text only
    assert "<b>bold</b>" in text  # HTML is kept unless stripHtml
    assert decision.counts == {"image": 2, "link": 3}


def test_html_scripts_and_escape_sequences_are_stripped() -> None:
    text = Sanitizer(None, strip_html=True).check(ANSWER).text
    assert text is not None
    assert "alert" not in text and "<b>" not in text and "\x1b" not in text and "[31m" not in text
    assert "bold red arr[0] is fine!" in text
    assert "https://evil.com" in text  # links are not checked without allowedLinkDomains


def test_a_clean_answer_passes_untouched() -> None:
    assert Sanitizer(["example.com"], True).check("Plain text, a[1] and 2 < 3.").action == "pass"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(ANSWER)), max_size=12))
def test_a_stream_cut_anywhere_is_sanitized_like_the_whole(cuts: list[int]) -> None:
    expected = Sanitizer(["example.com"], True).check(ANSWER).text
    sanitizer = Sanitizer(["example.com"], True)
    bounds = [0, *sorted(set(cuts)), len(ANSWER)]
    streamed = "".join(sanitizer.feed(ANSWER[a:b]) for a, b in itertools.pairwise(bounds))
    assert streamed + sanitizer.finish() == expected
