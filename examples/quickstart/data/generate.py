"""Generate the quickstart dataset: customer-support tickets routed to a category.

Two files, from disjoint sentence templates: `support-tickets.jsonl` (training) is built from
TRAINING_ISSUES/TRAINING_DETAILS, `support-tickets-heldout.jsonl` (the evaluation set) from
HELD_OUT_ISSUES/HELD_OUT_DETAILS, so no label-bearing sentence of a held-out ticket is ever seen in
training; only the category-neutral greetings, fillers and sign-offs are shared. Scoring the
held-out set therefore measures whether the model learned what a ticket is about, not whether it
remembers sentences.

Deterministic (fixed seeds, no other randomness): running it again reproduces both committed files
byte for byte; `--check` verifies that.

    python examples/quickstart/data/generate.py            # rewrite both files
    python examples/quickstart/data/generate.py --check    # exit 1 if either is out of date

`--pretraining-text FILE` also writes unlabeled ticket-like messages from the training templates
only (a different seed, no instruction format, no categories, none identical to a training ticket);
the tiny base model's committed corpus (components/kubetune_components/dev/corpus/corpus-support.txt)
was made with it, as domain pretraining text, so the base never saw a held-out sentence either.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

SEED = 20240611
PRETRAINING_SEED = SEED + 1
HELD_OUT_SEED = SEED + 2
EXAMPLES_PER_CATEGORY = 120
HELD_OUT_PER_CATEGORY = 12
PRETRAINING_MESSAGES = 450
HERE = Path(__file__).resolve().parent
DATASET_PATH = HERE / "support-tickets.jsonl"
HELD_OUT_PATH = HERE / "support-tickets-heldout.jsonl"

CATEGORIES = ("billing", "technical", "account", "shipping", "returns")
INSTRUCTION = "Route the support ticket to one team: billing, technical, account, shipping or returns."

PRODUCTS = [
    "wireless headphones",
    "coffee maker",
    "running shoes",
    "desk lamp",
    "phone case",
    "winter jacket",
    "blender",
    "backpack",
    "smart watch",
    "yoga mat",
    "kettle",
    "bookshelf",
    "camera bag",
    "water bottle",
    "keyboard",
    "office chair",
    "air purifier",
    "rain boots",
    "travel mug",
    "bike helmet",
    "toaster",
    "sofa cushion",
    "baby monitor",
    "electric toothbrush",
    "garden hose",
    "hiking boots",
]
DEVICES = ["iPhone", "Android phone", "laptop", "tablet", "Windows PC", "Mac", "Chromebook", "smart TV"]
APPS = ["the app", "the mobile app", "the website", "the desktop app", "your web app", "the dashboard"]
ERRORS = [
    "error 500",
    "error code E42",
    "a blank white screen",
    "an unknown error message",
    "a spinning wheel",
    "a timeout error",
    "error 403",
    "a message that says something went wrong",
]
CARRIERS = ["The courier", "The delivery driver", "The post office", "The carrier", "Your delivery partner"]
PLANS = ["monthly plan", "annual plan", "premium subscription", "family plan", "basic plan", "pro plan"]
NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Keiko",
    "Liam",
    "Maya",
    "Nils",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Yara",
    "Zoe",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# Only the training file and the pretraining corpus use these.
TRAINING_ISSUES = {
    "billing": [
        "I was charged twice for order {order}.",
        "My card was charged {amount} but I never placed this order.",
        "Can you send me an invoice for my last payment of {amount}?",
        "I cancelled my {plan} but I was still billed this month.",
        "The price at checkout was higher than the price shown on the product page.",
        "I was promised a refund of {amount} {days} days ago and it is still not on my card.",
        "My payment keeps getting declined even though my card is valid.",
        "I would like to change the credit card used for my {plan}.",
        "The discount code did not work and I paid the full price of {amount}.",
        "I was billed {amount} for a {plan} I never signed up for.",
        "You took {amount} from my bank account twice this month.",
    ],
    "technical": [
        "{app_cap} crashes every time I open it on my {device}.",
        "When I try to upload a photo, {app} shows {error}.",
        "The page will not load on my {device}, I only get {error}.",
        "Notifications stopped working on my {device} after the last update.",
        "My {product} will not connect to the app over bluetooth.",
        "The search button does nothing when I click it on {app}.",
        "{app_cap} has been extremely slow since yesterday and sometimes freezes completely.",
        "I keep getting {error} when I try to save my settings.",
        "Changes I make on my {device} do not sync to my {device2} anymore.",
        "The dark mode setting resets itself every time I restart {app}.",
        "{app_cap} logs me out every few minutes and shows {error}.",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "I cannot log in, it says my password is wrong but I am sure it is correct.",
        "Please change the email address on my account to my new one.",
        "I want to delete my account and all of my personal data.",
        "Someone else may have logged into my account, I got a login alert from another country.",
        "How do I turn on two factor authentication for my profile?",
        "I cannot change my username in the profile settings.",
        "The verification code sent to my phone never arrives, so I cannot sign in.",
        "I signed up with the wrong email address and need to fix it.",
        "My account shows someone else's name and address in the profile.",
        "I want to add my partner as a second user on my account.",
    ],
    "shipping": [
        "My order {order} was supposed to arrive {days} days ago and it is still not here.",
        "The tracking number for my {product} has not updated in {days} days.",
        "Can I change the delivery address for order {order}? It has not shipped yet.",
        "{carrier} left my package at the wrong house.",
        "How long does delivery to another country usually take?",
        "Is it possible to get express delivery for my {product}?",
        "Only half of my order arrived, the second box with the {product} is missing.",
        "The delivery was scheduled for today but nobody came and there is no note.",
        "Order {order} still shows as not shipped after {days} days.",
    ],
    "returns": [
        "I would like to return the {product} I bought last week, it does not fit.",
        "The {product} arrived damaged and I want to send it back.",
        "I received the wrong size of {product} and would like to exchange it.",
        "I sent back the {product} {days} days ago, did you receive my return?",
        "The {product} I ordered is a different color from the picture, can I exchange it?",
        "Is it too late to return a {product} I bought a month ago?",
        "I got a {product} I did not order, how do I send it back?",
        "The {product} stopped working after two days and I want to swap it for a new one.",
        "I changed my mind about the {product}, what is your return policy?",
    ],
}

TRAINING_DETAILS = {
    "billing": [
        "This is the second time this has happened.",
        "Please return the extra money as soon as possible.",
        "I pay with the card ending in {digits}.",
        "The charge appeared on {month} {day}.",
    ],
    "technical": [
        "I already tried restarting it and reinstalling {app}.",
        "I am using the latest version.",
        "It worked fine until last week.",
        "My internet connection is fine.",
    ],
    "account": [
        "I still have access to my old email address.",
        "I no longer have access to my old email.",
        "My username is {name_lower}{digits}.",
        "I registered about {years} years ago.",
    ],
    "shipping": [
        "The tracking page just says in transit.",
        "I paid extra for fast delivery.",
        "It was meant to be a birthday present.",
        "I was at home all day.",
    ],
    "returns": [
        "I still have the original box.",
        "I bought it as a gift for my {relative}.",
        "I would prefer an exchange if possible.",
        "The receipt is in my email.",
    ],
}

# Held out: these sentences never appear in the training file or in the tiny base's pretraining corpus.
HELD_OUT_ISSUES = {
    "billing": [
        "There is a charge of {amount} on my statement that I do not recognize.",
        "Why did the price of my {plan} go up without any notice?",
        "I need a receipt with my company tax number for order {order}.",
    ],
    "technical": [
        "The firmware update failed and now my {product} will not turn on.",
        "Videos freeze after a few seconds in {app}.",
        "The export to PDF button in {app} produces an empty file.",
    ],
    "account": [
        "My account was locked after too many login attempts.",
        "I would like to merge my two accounts into one.",
        "Please update the phone number linked to my account.",
    ],
    "shipping": [
        "The package says delivered but I never received it.",
        "My {product} is stuck in customs and I do not know what to do.",
        "{carrier} says my address does not exist, but I have lived here for years.",
    ],
    "returns": [
        "How do I print a return label for order {order}?",
        "Can I return the {product} to one of your stores instead of mailing it?",
        "The box was opened but the {product} is unused, can I still return it?",
    ],
}
HELD_OUT_DETAILS = {
    "billing": [
        "I have attached a screenshot of my bank statement.",
        "I only have one subscription with you.",
    ],
    "technical": [
        "I cleared the cache but nothing changed.",
        "It happens on both wifi and mobile data.",
    ],
    "account": [
        "I am worried about my personal data.",
        "I have tried three times already.",
    ],
    "shipping": [
        "My neighbors did not see any package either.",
        "I need it before {weekday}.",
    ],
    "returns": [
        "The tags are still attached.",
        "I only used it once.",
    ],
}

FILLERS = [
    "I have been a customer for {years} years.",
    "This is quite urgent.",
    "Please get back to me soon.",
    "I am writing from my work email.",
    "Sorry for the long message.",
    "I hope you can help.",
    "Nobody answered when I called yesterday.",
    "I usually love your service.",
]
OPENERS = [
    "Hi,",
    "Hello,",
    "Hi there,",
    "Good morning,",
    "Good afternoon,",
    "Dear support team,",
    "Hey,",
    "Hello team,",
    "",
    "",
    "",
]
CLOSERS = [
    "Thanks.",
    "Thank you!",
    "Thanks for your help.",
    "Best regards, {name}.",
    "Cheers, {name}.",
    "Kind regards, {name}",
    "",
    "",
]
RELATIVES = ["mother", "father", "sister", "brother", "friend", "son", "daughter"]


def _slots(rng: random.Random) -> dict[str, str]:
    app = rng.choice(APPS)
    device, device2 = rng.sample(DEVICES, 2)
    name = rng.choice(NAMES)
    return {
        "order": f"#{rng.randint(10000, 99999)}",
        "amount": f"${rng.randint(5, 300)}.{rng.choice(['00', '49', '95', '99'])}",
        "days": str(rng.randint(2, 14)),
        "product": rng.choice(PRODUCTS),
        "device": device,
        "device2": device2,
        "app": app,
        "app_cap": app[0].upper() + app[1:],
        "error": rng.choice(ERRORS),
        "carrier": rng.choice(CARRIERS),
        "plan": rng.choice(PLANS),
        "name": name,
        "name_lower": name.lower(),
        "digits": str(rng.randint(1000, 9999)),
        "month": rng.choice(MONTHS),
        "day": str(rng.randint(1, 28)),
        "weekday": rng.choice(WEEKDAYS),
        "years": str(rng.randint(2, 12)),
        "relative": rng.choice(RELATIVES),
    }


class Templates(NamedTuple):
    """The label-bearing sentences a split's tickets are built from, per category."""

    issues: Mapping[str, Sequence[str]]
    details: Mapping[str, Sequence[str]]


TRAINING = Templates(TRAINING_ISSUES, TRAINING_DETAILS)
HELD_OUT = Templates(HELD_OUT_ISSUES, HELD_OUT_DETAILS)


def compose_ticket(rng: random.Random, category: str, templates: Templates) -> str:
    slots = _slots(rng)
    middle = [rng.choice(templates.issues[category])]
    if rng.random() < 0.6:
        middle.append(rng.choice(templates.details[category]))
    if rng.random() < 0.35:
        middle.insert(rng.randint(0, len(middle)), rng.choice(FILLERS))
    parts = [rng.choice(OPENERS), *middle, rng.choice(CLOSERS)]
    return " ".join(part.format(**slots) for part in parts if part)


def generate_split(
    seed: int, per_category: int, templates: Templates, taken: Iterable[str] = ()
) -> list[dict[str, str]]:
    """`per_category` distinct tickets of every category, in shuffled order, none of them in `taken`."""
    rng = random.Random(seed)
    labels = [category for category in CATEGORIES for _ in range(per_category)]
    rng.shuffle(labels)
    seen = set(taken)
    examples = []
    for label in labels:
        ticket = compose_ticket(rng, label, templates)
        while ticket in seen:
            ticket = compose_ticket(rng, label, templates)
        seen.add(ticket)
        examples.append({"instruction": INSTRUCTION, "input": ticket, "output": label})
    return examples


def generate_dataset() -> list[dict[str, str]]:
    return generate_split(SEED, EXAMPLES_PER_CATEGORY, TRAINING)


def generate_held_out(dataset: list[dict[str, str]]) -> list[dict[str, str]]:
    return generate_split(
        HELD_OUT_SEED, HELD_OUT_PER_CATEGORY, HELD_OUT, taken=(ex["input"] for ex in dataset)
    )


def generate_pretraining_text(dataset: list[dict[str, str]]) -> str:
    """Unlabeled messages from the training templates only, none identical to a training ticket."""
    rng = random.Random(PRETRAINING_SEED)
    taken = {example["input"] for example in dataset}
    messages: list[str] = []
    while len(messages) < PRETRAINING_MESSAGES:
        ticket = compose_ticket(rng, rng.choice(CATEGORIES), TRAINING)
        if ticket not in taken:
            taken.add(ticket)
            messages.append(ticket)
    return "\n\n".join(messages) + "\n"


def template_pattern(template: str) -> re.Pattern[str]:
    """Matches any filling of `template`'s slots, ignoring case and runs of whitespace."""
    pieces = re.split(r"\{\w+\}", template)
    literal = [r"\s+".join(re.escape(word) for word in piece.split(" ")) for piece in pieces]
    return re.compile(".+?".join(literal), re.IGNORECASE)


def render_jsonl(examples: list[dict[str, str]]) -> str:
    return "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)


def _category_counts(examples: list[dict[str, str]]) -> dict[str, int]:
    return {category: sum(ex["output"] == category for ex in examples) for category in CATEGORIES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DATASET_PATH, help="where to write the training JSONL")
    parser.add_argument(
        "--held-out-out", type=Path, default=HELD_OUT_PATH, help="where to write the held-out JSONL"
    )
    parser.add_argument("--check", action="store_true", help="only verify that both files are up to date")
    parser.add_argument("--pretraining-text", type=Path, help="also write unlabeled domain text here")
    args = parser.parse_args(argv)
    dataset = generate_dataset()
    held_out = generate_held_out(dataset)
    outputs = [(args.out, dataset), (args.held_out_out, held_out)]
    if args.check:
        stale = [
            path
            for path, examples in outputs
            if not path.is_file() or path.read_text(encoding="utf-8") != render_jsonl(examples)
        ]
        for path in stale:
            print(f"{path} is out of date; run {Path(__file__).name} to regenerate it", file=sys.stderr)
        if stale:
            return 1
        print(f"{args.out} ({len(dataset)}) and {args.held_out_out} ({len(held_out)}) are up to date")
        return 0
    for path, examples in outputs:
        path.write_text(render_jsonl(examples), encoding="utf-8")
        print(f"wrote {len(examples)} examples to {path}: {_category_counts(examples)}")
    if args.pretraining_text:
        args.pretraining_text.write_text(generate_pretraining_text(dataset), encoding="utf-8")
        print(f"wrote {PRETRAINING_MESSAGES} unlabeled messages to {args.pretraining_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
