"""Writes pii-labelled.jsonl: texts with the character spans of the PII in them, for benchmarks/pii_eval.py.

    python benchmarks/data/make_pii_labelled.py      # rewrites benchmarks/data/pii-labelled.jsonl

Each line is {"id", "kind", "text", "spans": [{"entity", "start", "end"}]}. `kind` is `positive` (one
or more entities, in the formats people write them, every number with a valid checksum), `hard-negative`
(look-alikes that are not PII: order and ticket numbers, versions, invalid-checksum cards and IBANs,
ISBNs, prices, dates) or `plain`. Spans are written here with [[ENTITY:value]] marks, so a label can
never drift from its text. The values are documentation examples (example.org, 555 numbers, test card
numbers, the IBAN registry's examples), not anyone's data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

OUT = Path(__file__).with_name("pii-labelled.jsonl")
MARK = re.compile(r"\[\[([A-Z_]+):(.+?)\]\]")

POSITIVES = [
    # EMAIL_ADDRESS
    "Please send the invoice to [[EMAIL_ADDRESS:jane.roe@example.org]] by Friday.",
    "Contact: [[EMAIL_ADDRESS:j.smith+billing@mail.example.co.uk]]",
    "cc [[EMAIL_ADDRESS:ops-team@kubetune.dev]] and [[EMAIL_ADDRESS:anna_k@firma.de]] on the incident.",
    "My address changed to [[EMAIL_ADDRESS:PAT.LEE@EXAMPLE.COM]], update it please.",
    "From: [[EMAIL_ADDRESS:noreply@billing.example.net]]\nSubject: receipt",
    "reply to [[EMAIL_ADDRESS:m.garcia@universidad.es]] or to the list",
    "The user ([[EMAIL_ADDRESS:user1234@example.io]]) cannot log in.",
    "email: [[EMAIL_ADDRESS:o'brien@example.ie]]",
    "Forwarding to [[EMAIL_ADDRESS:support@shop.example.com]].",
    "ping [[EMAIL_ADDRESS:dev.null@example.org]] if the build breaks",
    # PHONE_NUMBER
    "Call me back on [[PHONE_NUMBER:+1 415-555-0132]] after 5pm.",
    "Our office: [[PHONE_NUMBER:(212) 555-0198]].",
    "UK line [[PHONE_NUMBER:+44 20 7946 0958]], ask for Sam.",
    "phone [[PHONE_NUMBER:020 7946 0958]] (London)",
    "Berlin desk: [[PHONE_NUMBER:+49 30 901820]]",
    "Paris: [[PHONE_NUMBER:+33 1 42 68 53 00]]",
    "text my mobile [[PHONE_NUMBER:415.555.0199]]",
    "Tel. [[PHONE_NUMBER:+1 (646) 555-0142]] ext. 12",
    "cell: [[PHONE_NUMBER:+91 98765 43210]]",
    "You can reach the clinic at [[PHONE_NUMBER:(416) 555-0123]].",
    # CREDIT_CARD
    "Charge it to [[CREDIT_CARD:4111 1111 1111 1111]] please.",
    "card number [[CREDIT_CARD:5500 0000 0000 0004]] exp 12/29",
    "Amex [[CREDIT_CARD:3782 822463 10005]] was declined",
    "Visa: [[CREDIT_CARD:4012888888881881]]",
    "Use [[CREDIT_CARD:5105-1051-0510-5100]] for the deposit.",
    "paid with [[CREDIT_CARD:6011 0000 0000 0004]] yesterday",
    "The card ending in 1111, full number [[CREDIT_CARD:4242 4242 4242 4242]], was charged twice.",
    "CC#[[CREDIT_CARD:4000056655665556]]",
    "credit card: [[CREDIT_CARD:3530 1113 3330 0000]]",
    "refund to [[CREDIT_CARD:5555 5555 5555 4444]]",
    # IBAN_CODE
    "Wire it to IBAN [[IBAN_CODE:DE89 3704 0044 0532 0130 00]].",
    "Account: [[IBAN_CODE:GB82 WEST 1234 5698 7654 32]]",
    "IBAN [[IBAN_CODE:FR14 2004 1010 0505 0001 3M02 606]] (Paris branch)",
    "pay to [[IBAN_CODE:NL91ABNA0417164300]]",
    "Spanish account [[IBAN_CODE:ES91 2100 0418 4502 0005 1332]]",
    "bank transfer to [[IBAN_CODE:IT60X0542811101000000123456]] please",
    "Swiss IBAN: [[IBAN_CODE:CH93 0076 2011 6238 5295 7]]",
    "the refund goes to [[IBAN_CODE:BE68539007547034]]",
    "IBAN: [[IBAN_CODE:AT61 1904 3002 3457 3201]]",
    "Please use [[IBAN_CODE:IE29 AIBK 9311 5212 3456 78]] for the transaction.",
    # US_SSN
    "My SSN is [[US_SSN:536-22-1234]].",
    "social security number [[US_SSN:412-67-8821]] on the form",
    "SSN: [[US_SSN:301 55 0192]]",
    "Applicant SSN [[US_SSN:245-71-3380]], DOB withheld.",
    "ssn [[US_SSN:536221234]]",
    "Social Security No. [[US_SSN:467-39-0051]]",
    "the employee's SSN ([[US_SSN:612-48-2297]]) is on file",
    "SSN#[[US_SSN:381-04-7712]]",
    "Her social security number is [[US_SSN:529.63.4480]].",
    "tax id (SSN) [[US_SSN:455-12-9034]]",
    # IP_ADDRESS
    "Requests came from [[IP_ADDRESS:203.0.113.7]] overnight.",
    "the router is at [[IP_ADDRESS:192.168.10.20]]",
    "Blocked IP: [[IP_ADDRESS:198.51.100.42]]",
    "ssh into [[IP_ADDRESS:10.0.0.1]] and restart",
    "IPv6 [[IP_ADDRESS:2001:db8::8a2e:370:7334]] is flapping",
    "link-local [[IP_ADDRESS:fe80::1ff:fe23:4567:890a]] seen",
    "my ip is [[IP_ADDRESS:172.16.254.1]]",
    "X-Forwarded-For: [[IP_ADDRESS:203.0.113.195]]",
    "DNS at [[IP_ADDRESS:8.8.4.4]] timed out",
    "login from [[IP_ADDRESS:2001:db8:85a3::8a2e:370:7334]] failed",
    # written the way people do when no form asks them to (some of these the patterns miss)
    "call me on [[PHONE_NUMBER:4155550132]] tonight",
    "my number is [[PHONE_NUMBER:555-0142]], local",
    "card [[CREDIT_CARD:4111.1111.1111.1111]] please",
    "iban [[IBAN_CODE:de89 3704 0044 0532 0130 00]]",
    "write to [[EMAIL_ADDRESS:jane dot roe at example dot org]]",
    "it is [[US_SSN:536-22-1234]], as on the form",
    "my number: [[US_SSN:536221234]]",
    "the box at [[IP_ADDRESS:203.0.113.7]]:8080 is down",
    # several at once
    "I'm [[EMAIL_ADDRESS:sam@example.com]], phone [[PHONE_NUMBER:+1 415-555-0100]], card "
    "[[CREDIT_CARD:4111 1111 1111 1111]].",
    "SSN [[US_SSN:536-22-1234]], IBAN [[IBAN_CODE:DE89 3704 0044 0532 0130 00]], from "
    "[[IP_ADDRESS:198.51.100.7]]",
]

HARD_NEGATIVES = [
    "Card 4111 1111 1111 1112 fails the Luhn check.",
    "Test number 1234 5678 9012 3456 is not a card.",
    "Account 5500 0000 0000 0005 was mistyped.",
    "IBAN DE89 3704 0044 0532 0130 01 bounced (bad checksum).",
    "GB82 WEST 1234 5698 7654 33 is not valid.",
    "Upgrade from v2.13.0 to 2.14.1 first.",
    "Windows build 10.0.19041.1 is required.",
    "See section 4.2.1 of the spec.",
    "Version 999.10.10.10 does not exist.",
    "Your order A-10293847 ships Tuesday.",
    "Tracking number 1Z999AA10123456784.",
    "Invoice INV-2024-000187 is overdue.",
    "ISBN 978-3-16-148410-0",
    "The total was $1,234,567.89 after tax.",
    "Meet on 2024-05-17 at 10:30.",
    "The run took 12:45:09 in total.",
    "Budget line 4.250.000 EUR approved.",
    "Order number 100234987 was refunded.",
    "Ticket #48217730 reopened.",
    "Release 3.8.18 of spaCy.",
    "Port 8080 and 8443 are open.",
    "The SKU is 00012-3456-7.",
    "Coordinates 52.5200, 13.4050.",
    "Model has 1,048,576 parameters.",
    "Use the @kubetune handle on Mastodon.",
    "Write to support via the form, not email.",
    "Our address is support at example dot org.",
    "user@localhost is the default account",
    "The pattern is name@domain, nothing more.",
    "Room 4.12, building 7.",
    "Serial 000-00-0000 is a placeholder.",
    "Part 987-65-4320 is a placeholder too.",
    "Batch 2024-11-0192 passed QA.",
    "Timestamp 1717430400 in seconds.",
    "Hash a3f5c9e1 matched.",
    "Git commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904.",
    "Matrix 3x3, scale 1.0.0.",
    "The ratio 16:9 is standard.",
    "Call the helpdesk from the app.",
    "The IBAN field was left empty.",
    "Lot 12-345-678 was recalled.",
    "Case 2023-CV-004512 filed.",
    "Flight LH 400 departs 10:55.",
    "Chapter 10.4.2.3 covers it.",
    "SSN format is three digits, two, four.",
    "My card was stolen; I have no number yet.",
    "Reference 536221234 attached.",
    "EAN 4006381333931 on the box.",
    "Dial extension 4421 internally.",
    "Years 1999-2004 were slow.",
]

PLAIN = [
    "The parcel arrived damaged, please send a replacement.",
    "How do I reset my password?",
    "The app crashes when I open settings.",
    "I was charged twice this month.",
    "Can I return shoes after thirty days?",
    "Thanks, the issue is fixed now.",
    "Please route this to the billing team.",
    "What are your opening hours on Sunday?",
    "The discount code did not apply at checkout.",
    "My account is locked after too many attempts.",
]


def parse(marked: str) -> tuple[str, list[dict[str, object]]]:
    text, spans, position = "", [], 0
    for match in MARK.finditer(marked):
        text += marked[position : match.start()]
        start = len(text)
        text += match.group(2)
        spans.append({"entity": match.group(1), "start": start, "end": len(text)})
        position = match.end()
    return text + marked[position:], spans


def main() -> None:
    lines = []
    for kind, texts in (("positive", POSITIVES), ("hard-negative", HARD_NEGATIVES), ("plain", PLAIN)):
        for number, marked in enumerate(texts, start=1):
            text, spans = parse(marked)
            record = {"id": f"{kind}-{number:03d}", "kind": kind, "text": text, "spans": spans}
            lines.append(json.dumps(record, ensure_ascii=False))
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} texts to {OUT}")


if __name__ == "__main__":
    main()
