"""Generate the quickstart dataset: customer-support tickets routed to a category.

Deterministic (fixed seed, no other randomness): running it again reproduces the committed
`support-tickets.jsonl` byte for byte; `--check` verifies that.

    python examples/quickstart/data/generate.py            # rewrite support-tickets.jsonl
    python examples/quickstart/data/generate.py --check    # exit 1 if it is out of date

`--pretraining-text FILE` also writes unlabeled ticket-like messages (a different seed, no
instruction format, no categories, none identical to a dataset ticket); the tiny base model's
committed corpus (components/kubetune_components/dev/corpus/corpus-support.txt) was made with it, as
domain pretraining text.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20240611
PRETRAINING_SEED = SEED + 1
EXAMPLES_PER_CATEGORY = 120
PRETRAINING_MESSAGES = 450
HERE = Path(__file__).resolve().parent
DATASET_PATH = HERE / "support-tickets.jsonl"

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

ISSUES = {
    "billing": [
        "I was charged twice for order {order}.",
        "My card was charged {amount} but I never placed this order.",
        "There is a charge of {amount} on my statement that I do not recognize.",
        "Can you send me an invoice for my last payment of {amount}?",
        "I cancelled my {plan} but I was still billed this month.",
        "The price at checkout was higher than the price shown on the product page.",
        "I was promised a refund of {amount} {days} days ago and it is still not on my card.",
        "My payment keeps getting declined even though my card is valid.",
        "Why did the price of my {plan} go up without any notice?",
        "I would like to change the credit card used for my {plan}.",
        "The discount code did not work and I paid the full price of {amount}.",
        "I need a receipt with my company tax number for order {order}.",
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
        "The firmware update failed and now my {product} will not turn on.",
        "Videos freeze after a few seconds in {app}.",
        "{app_cap} has been extremely slow since yesterday and sometimes freezes completely.",
        "I keep getting {error} when I try to save my settings.",
        "Changes I make on my {device} do not sync to my {device2} anymore.",
        "The dark mode setting resets itself every time I restart {app}.",
        "{app_cap} logs me out every few minutes and shows {error}.",
        "The export to PDF button in {app} produces an empty file.",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "I cannot log in, it says my password is wrong but I am sure it is correct.",
        "Please change the email address on my account to my new one.",
        "My account was locked after too many login attempts.",
        "I want to delete my account and all of my personal data.",
        "Someone else may have logged into my account, I got a login alert from another country.",
        "How do I turn on two factor authentication for my profile?",
        "I would like to merge my two accounts into one.",
        "I cannot change my username in the profile settings.",
        "The verification code sent to my phone never arrives, so I cannot sign in.",
        "Please update the phone number linked to my account.",
        "I signed up with the wrong email address and need to fix it.",
        "My account shows someone else's name and address in the profile.",
        "I want to add my partner as a second user on my account.",
    ],
    "shipping": [
        "My order {order} was supposed to arrive {days} days ago and it is still not here.",
        "The tracking number for my {product} has not updated in {days} days.",
        "The package says delivered but I never received it.",
        "Can I change the delivery address for order {order}? It has not shipped yet.",
        "{carrier} left my package at the wrong house.",
        "How long does delivery to another country usually take?",
        "My {product} is stuck in customs and I do not know what to do.",
        "Is it possible to get express delivery for my {product}?",
        "Only half of my order arrived, the second box with the {product} is missing.",
        "The delivery was scheduled for today but nobody came and there is no note.",
        "Order {order} still shows as not shipped after {days} days.",
        "{carrier} says my address does not exist, but I have lived here for years.",
    ],
    "returns": [
        "I would like to return the {product} I bought last week, it does not fit.",
        "The {product} arrived damaged and I want to send it back.",
        "I received the wrong size of {product} and would like to exchange it.",
        "How do I print a return label for order {order}?",
        "I sent back the {product} {days} days ago, did you receive my return?",
        "The {product} I ordered is a different color from the picture, can I exchange it?",
        "Is it too late to return a {product} I bought a month ago?",
        "I got a {product} I did not order, how do I send it back?",
        "Can I return the {product} to one of your stores instead of mailing it?",
        "The box was opened but the {product} is unused, can I still return it?",
        "The {product} stopped working after two days and I want to swap it for a new one.",
        "I changed my mind about the {product}, what is your return policy?",
    ],
}

DETAILS = {
    "billing": [
        "I have attached a screenshot of my bank statement.",
        "This is the second time this has happened.",
        "Please return the extra money as soon as possible.",
        "I pay with the card ending in {digits}.",
        "The charge appeared on {month} {day}.",
        "I only have one subscription with you.",
    ],
    "technical": [
        "I already tried restarting it and reinstalling {app}.",
        "I am using the latest version.",
        "It worked fine until last week.",
        "I cleared the cache but nothing changed.",
        "My internet connection is fine.",
        "It happens on both wifi and mobile data.",
    ],
    "account": [
        "I still have access to my old email address.",
        "I no longer have access to my old email.",
        "My username is {name_lower}{digits}.",
        "I have tried three times already.",
        "I am worried about my personal data.",
        "I registered about {years} years ago.",
    ],
    "shipping": [
        "I need it before {weekday}.",
        "The tracking page just says in transit.",
        "I paid extra for fast delivery.",
        "My neighbors did not see any package either.",
        "It was meant to be a birthday present.",
        "I was at home all day.",
    ],
    "returns": [
        "I still have the original box.",
        "The tags are still attached.",
        "I bought it as a gift for my {relative}.",
        "I would prefer an exchange if possible.",
        "The receipt is in my email.",
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


def compose_ticket(rng: random.Random, category: str) -> str:
    slots = _slots(rng)
    middle = [rng.choice(ISSUES[category])]
    if rng.random() < 0.6:
        middle.append(rng.choice(DETAILS[category]))
    if rng.random() < 0.35:
        middle.insert(rng.randint(0, len(middle)), rng.choice(FILLERS))
    parts = [rng.choice(OPENERS), *middle, rng.choice(CLOSERS)]
    return " ".join(part.format(**slots) for part in parts if part)


def generate_dataset() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    labels = [category for category in CATEGORIES for _ in range(EXAMPLES_PER_CATEGORY)]
    rng.shuffle(labels)
    seen: set[str] = set()
    examples = []
    for label in labels:
        ticket = compose_ticket(rng, label)
        while ticket in seen:
            ticket = compose_ticket(rng, label)
        seen.add(ticket)
        examples.append({"instruction": INSTRUCTION, "input": ticket, "output": label})
    return examples


def generate_pretraining_text(dataset: list[dict[str, str]]) -> str:
    rng = random.Random(PRETRAINING_SEED)
    taken = {example["input"] for example in dataset}
    messages: list[str] = []
    while len(messages) < PRETRAINING_MESSAGES:
        ticket = compose_ticket(rng, rng.choice(CATEGORIES))
        if ticket not in taken:
            taken.add(ticket)
            messages.append(ticket)
    return "\n\n".join(messages) + "\n"


def render_jsonl(examples: list[dict[str, str]]) -> str:
    return "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DATASET_PATH, help="where to write the JSONL dataset")
    parser.add_argument("--check", action="store_true", help="only verify that --out is up to date")
    parser.add_argument("--pretraining-text", type=Path, help="also write unlabeled domain text here")
    args = parser.parse_args(argv)
    dataset = generate_dataset()
    content = render_jsonl(dataset)
    if args.check:
        if not args.out.is_file() or args.out.read_text(encoding="utf-8") != content:
            print(f"{args.out} is out of date; run {Path(__file__).name} to regenerate it", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(dataset)} examples)")
        return 0
    args.out.write_text(content, encoding="utf-8")
    counts = {category: sum(ex["output"] == category for ex in dataset) for category in CATEGORIES}
    print(f"wrote {len(dataset)} examples to {args.out}: {counts}")
    if args.pretraining_text:
        args.pretraining_text.write_text(generate_pretraining_text(dataset), encoding="utf-8")
        print(f"wrote {PRETRAINING_MESSAGES} unlabeled messages to {args.pretraining_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
