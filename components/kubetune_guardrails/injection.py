# ruff: noqa: E501  (the rules are regular expressions, easier to read unbroken)
"""Prompt-injection detection on user-supplied text: weighted rules, optionally combined with a classifier.

Each rule that matches contributes its weight; weights combine as independent evidence
(1 - prod(1 - w)), so two weak signals together outweigh one. A classifier's probability joins the
same way. The rules describe families rather than phrases: a verb of discarding (ignore, set aside,
pay no attention to, ...) aimed at the model's instructions (rules, guidelines, prompt, ...), in
several word orders and a few major languages; a persona that "has no rules"; chat-template tokens
of several model families; instructions addressed to "the AI" inside pasted content.

The text is normalized first (NFKC, zero-width characters removed, runs of whitespace collapsed).
Obfuscated copies are decoded and scanned as well, each only when a cheap test says it could differ:
base64, hex and URL-encoded runs, ROT13, leetspeak, letter-spaced words, homoglyphs (Cyrillic and
Greek look-alikes, combining marks), Unicode tag characters and HTML comments. A rule that matches
only in such a copy also counts as a hidden payload. An attack quoted inside a text that talks about
attacks ("Is 'ignore previous instructions' still an effective attack?") counts for less: a mention,
not a use.

Cost: each rule has cheap anchors (words one of which every match contains); the anchors of all rules
are found in one pass, and a rule's regex runs only when its anchors are there.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from kubetune_guardrails.decisions import GuardDecision, GuardErrorCode, GuardMode

GUARD_NAME = "prompt_injection"
ERROR_CODE: GuardErrorCode = "prompt_injection_detected"


@dataclass(frozen=True)
class Rule:
    name: str
    weight: float
    pattern: re.Pattern[str]
    """Matched against the lower-cased text (twice as fast as matching with re.IGNORECASE)."""
    anchors: tuple[str, ...]
    """Lower-case substrings one of which every match contains: a text with none skips the regex."""
    requires: tuple[tuple[str, ...], ...] = ()
    """More such sets, each of which must hit too: for rules whose first anchors are common words ("send")."""

    case_sensitive: bool = False
    """Matched against the text as written (a persona called DAN, not the name Dan), anchors too."""

    def matches(self, text: str, lowered: str, present: AbstractSet[str]) -> bool:
        """Whether the rule matches; ``present`` holds the (lower-case) anchors found in ``lowered``."""
        if self.case_sensitive:
            return any(anchor in text for anchor in self.anchors) and self.pattern.search(text) is not None
        return (
            any(anchor in present for anchor in self.anchors)
            and all(any(anchor in present for anchor in group) for group in self.requires)
            and self.pattern.search(lowered) is not None
        )


def _rule(
    name: str,
    weight: float,
    anchors: tuple[str, ...],
    *alternatives: str,
    requires: tuple[tuple[str, ...], ...] = (),
    case_sensitive: bool = False,
) -> Rule:
    source = "|".join(f"(?:{a})" for a in alternatives)
    if case_sensitive:
        return Rule(name, weight, re.compile(source), anchors, requires, case_sensitive)
    if re.search(r"\\[A-Z]", source):
        raise ValueError(
            f"rule {name}: an upper-case escape would change meaning once the pattern is lower-cased"
        )
    return Rule(name, weight, re.compile(source.lower()), tuple(dict.fromkeys(anchors)), requires)


# -- the vocabulary the rules share ------------------------------------------------------------------

_NOT_NEGATED = r"(?<!n't )(?<!not )(?<!never )"  # "don't forget your instructions" is benign
_DISCARD = (
    _NOT_NEGATED
    + r"\b(?:ignore|disregard|forget|skip|override|overrule|bypass|drop|abandon|neglect|discard|dismiss|ditch|scrap|"
    r"set aside|put aside|cast aside|throw (?:out|away)|pay no (?:attention|heed|mind) to|stop (?:following|obeying)|"
    r"no longer (?:follow|obey)|(?:do not|don't|dont) (?:follow|obey|listen to|adhere to|comply with)|refuse to (?:follow|obey))"
)
_DISCARD_ANCHORS = (
    "ignor",
    "disregard",
    "forget",
    "skip",
    "overrid",
    "overrul",
    "bypass",
    "drop",
    "abandon",
    "neglect",
    "discard",
    "dismiss",
    "ditch",
    "scrap",
    "aside",
    "throw",
    "no attention",
    "no heed",
    "no mind",
    "stop follow",
    "stop obey",
    "follow",
    "obey",
    "listen to",
    "adhere",
    "comply",
    "refuse to",
)
_PREVIOUS = r"(?:all |any |the |your |my |these |those |every |of )*(?:previous|prior|above|preceding|earlier|former|original|initial|system|developer|existing|built-in|safety)"
_INSTRUCTIONS = r"(?:instructions?|prompts?|rules?|directives?|guidelines?|context|commands?|constraints?|guardrails?|programming|restrictions?|policies|policy|orders|training|limitations?|configuration)"
_GIVEN = r"(?:you (?:were|have been|'ve been|got|received|have received|had) (?:given|told|provided|taught)?|given (?:to )?you|above|before|so far|earlier|previously|until now|up to now|in your system prompt)"
_CORE_INSTRUCTIONS = (
    r"(?:instructions?|prompts?|rules?|directives?|guidelines?|guardrails?|programming|restrictions?)"
)
_AI = r"(?:AI|A\.I\.|LLM|language model|assistant|chatbot|bot|agent|model|GPT|copilot)"

# Chat-template tokens of several families: ChatML, Llama 2/3, Mistral, Gemma, Phi-3/Zephyr, Cohere, harmony.
_OPEN_TOKEN = r"<\|(?:im_start|start_header_id|start|begin_of_text|system|user|assistant|START_OF_TURN_TOKEN)\|>|<start_of_turn>|\[INST\]|<<SYS>>|\[SYSTEM_PROMPT\]"
_CLOSE_TOKEN = r"<\|(?:im_end|eot_id|eom_id|endoftext|end_of_text|end|return|END_OF_TURN_TOKEN)\|>|<end_of_turn>|\[/INST\]|<</SYS>>|\[/SYSTEM_PROMPT\]|</s>"

# Overrides in a few major languages (French, Spanish, Portuguese, Italian, German, Dutch, Polish, Russian).
_DISCARD_ML = r"\b(?:ignore[zr]?|ignora(?:te|r|d)?|ignoriere?n?|ignorier|negeer|vergiss|vergessen sie|vergeet|olvida(?:te|r|d)?|oublie[zr]?|dimentica(?:te)?|esque[cç]a|esquece|zignoruj|ignoruj|zapomnij|забудь(?:те)?|игнорируй(?:те)?|проигнорируй(?:те)?|не обращай(?:те)? внимания на)\b"
_INSTRUCTIONS_ML = r"(?:instructions?|instrucciones|instrucci[oó]n|instru[cç][oõ]es|instru[cç][aã]o|istruzioni|anweisungen|anweisung|regeln|vorgaben|befehle|r[eè]gles|consignes|directives|reglas|indicaciones|regole|regras|instructies|regels|instrukcje|polecenia|zasady|инструкци\w*|правила|указания|команды)"
_PREVIOUS_ML = r"(?:pr[eé]c[eé]dentes|ant[eé]rieures|ci-dessus|toutes|anteriores|previas|todas|precedenti|tutte|vorherigen|bisherigen|obigen|vorigen|alten|urspr[uü]nglichen|alle|eerdere|vorige|wszystkie|poprzednie|все|предыдущие|прежние)"
_SYSTEM_PROMPT_ML = r"(?:prompt del sistema|prompt (?:du )?syst[eè]me|systemprompt|system-prompt|systemanweisung\w*|prompt di sistema|prompt do sistema|системн\w+ (?:промпт|подсказк\w*|инструкци\w*)|系统提示|系統提示|システムプロンプト)"

RULES: tuple[Rule, ...] = (
    _rule(
        "instruction_override",
        0.8,
        (*_DISCARD_ANCHORS, "instruction", "from now on"),
        rf"{_DISCARD}\b[^.\n]{{0,30}}\b{_PREVIOUS}\b[^.\n]{{0,20}}\b{_INSTRUCTIONS}",
        rf"{_DISCARD}\b (?:all |any |every |each |the |of |these |those )*(?:\w+ )?{_INSTRUCTIONS}\b[^.\n]{{0,12}}\b{_GIVEN}",
        rf"{_DISCARD}\b (?:all |any |every |of )*your (?:\w+ ){{0,2}}{_INSTRUCTIONS}\b",
        rf"{_DISCARD}\b (?:everything|all|anything|whatever|what) (?:(?:you|they) (?:were |have been |had been )?(?:told|said|taught|instructed|given)|your (?:developers?|creators?|makers?|programmers?|trainers?|owners?|operators?|company) (?:told|said|taught|instructed)|(?:said|written|stated) (?:above|before|earlier))",
        r"\b(?:new|updated|real|actual|revised) (?:system )?instructions?\s*(?:follow|are|:)",
        r"\bfrom now on,? (?:you (?:will|must|are|shall)|ignore|respond only)",
        r"\bfrom now on\b[^.\n]{0,60}\bwithout (?:any )?(?:restrictions|filters|censorship)|\bwithout (?:any )?(?:restrictions|filters|censorship)\b[^.\n]{0,30}\bfrom now on",
        rf"{_DISCARD}\b (?:all |the )?(?:above|preceding|prior) directions",
        r"\b(?:ignore|disregard|forget)\b (?:the |all |everything )?(?:above|before|prior)\b",
        r"\bignore (?:the|all|your|these) rules\b(?! (?:of|for|on|about|in|from|to|at|when)\b)",
        rf"(?:^|[.!?;:,\n-]\s*|\b(?:and|please|just|now|so|then) ){_DISCARD}\b (?:all )?the (?:guidelines|rules|instructions|guardrails|restrictions)\b(?! (?:of|for|on|about|in|from|to|at) )",
    ),
    _rule(
        "instruction_override",
        0.8,
        (
            "erase",
            "reset",
            "wipe",
            "delete",
            "clear",
            "remove",
            "scratch",
            "replace",
            "overrid",
            "as if",
            "as though",
            "told",
            "given",
            "instructed",
        ),
        r"\b(?:erase|reset|wipe|delete|clear|remove|scratch|replace)\b (?:all |any |of )*your (?:\w+ ){0,2}(?:instructions|rules|guidelines|directives|programming|system prompt)\b",
        r"\boverride (?:your|the) (?:default|normal|usual|standard|built-in) (?:behaviou?r|settings|mode|programming|responses)\b",
        r"\b(?:act|behave|respond|answer) as (?:if|though) (?:you (?:had|have|were given) no|there (?:were|was|are|is) no) (?:system prompt|instructions|rules|guidelines|restrictions)\b",
        r"\b(?:whatever|everything|anything|what) (?:you were|you've been|you have been) (?:told|given|instructed)\b[^.\n]{0,25}\b(?:doesn't|does not|no longer|don't|do not) (?:matter|apply|count)",
    ),
    _rule(
        "instruction_override_translated",
        0.8,
        (
            "ignor",
            "negeer",
            "vergiss",
            "vergessen",
            "vergeet",
            "olvid",
            "oubli",
            "dimentic",
            "esque",
            "zapomnij",
            "zignor",
            "проигнор",
            "забуд",
            "игнор",
            "не обращ",
            "忽略",
            "无视",
            "無視",
            "忘",
            "不要",
            "跳过",
            "무시",
            "잊어",
            "yok say",
            "görmezden",
            "unut",
            "تجاهل",
            "انس",
            "अनदेखा",
            "नज़रअंदाज़",
            "नजरअंदाज",
            "भूल",
            "abaikan",
            "lupakan",
            "bỏ qua",
            "quên",
        ),
        rf"{_DISCARD_ML}[^.\n]{{0,30}}\b{_PREVIOUS_ML}\b[^.\n]{{0,20}}{_INSTRUCTIONS_ML}",
        rf"{_DISCARD_ML}[^.\n]{{0,30}}{_INSTRUCTIONS_ML}[^.\n]{{0,15}}\b{_PREVIOUS_ML}",
        rf"{_DISCARD_ML} (?:todo lo (?:anterior|que te dijeron)|tout ce qui pr[eé]c[eè]de|tout ce qu'on t'a dit|alles (?:bisherige|vorherige|obige|davor)|tutto (?:quanto )?(?:sopra|quello che ti hanno detto)|tudo (?:o )?que (?:foi dito|te disseram)|вс[её] (?:что было )?(?:выше|сказанное|предыдущее))",
        r"(?:忽略|无视|無視|忘记|忘掉|忘記|不要理会|不要遵守|跳过)[^。\n]{0,12}(?:指令|指示|说明|規則|规则|提示|命令|要求|设定|設定)",
        r"(?:指示|命令|ルール|指令|設定|プロンプト)[^。\n]{0,10}(?:無視|忘れ)",
        r"(?:이전|모든|위의)[^.\n]{0,10}(?:지시|명령|규칙|지침)[^.\n]{0,10}(?:무시|잊어)",
        r"(?:önceki|tüm|yukar\u0131daki)[^.\n]{0,20}(?:talimat|kural|yönerge|komut)[^.\n]{0,20}(?:yok say|görmezden gel|unut)",
        r"(?:تجاهل|تجاهلي|انس|انسى)[^.\n]{0,25}(?:التعليمات|الأوامر|القواعد|التوجيهات)",
        r"(?:निर्देश|नियम)[^।.\n]{0,30}(?:अनदेखा|नज़रअंदाज़|नजरअंदाज|भूल जा)",
        r"\b(?:abaikan|lupakan)\b[^.\n]{0,30}\b(?:instruksi|perintah|aturan|petunjuk)",
        r"(?:bỏ qua|quên)[^.\n]{0,30}(?:hướng dẫn|chỉ dẫn|quy tắc|lệnh|chỉ thị)",
    ),
    _rule(
        "instructions_declared_void",
        0.6,
        (
            "cancel",
            "void",
            "revoked",
            "suspended",
            "overridden",
            "overruled",
            "nullified",
            "lifted",
            "deactivated",
            "disabled",
            "no longer",
            "rescinded",
            "off",
            "gone",
            "removed",
            "outdated",
            "obsolete",
            "irrelevant",
            "invalid",
            "expired",
            "not exist",
            "nonexistent",
            "non-existent",
        ),
        rf"\b(?:{_PREVIOUS}\b[^.\n]{{0,15}}\b{_CORE_INSTRUCTIONS}|{_CORE_INSTRUCTIONS} (?:above|before this|you were given|given to you))\b[^.\n]{{0,12}}\b(?:cancell?ed|void|revoked|suspended|overridden|overruled|nullified|lifted|deactivated|disabled|rescinded|no longer (?:valid|apply|applies|in effect|active|binding))\b",
        r"\b(?:all|your|the|my|these) (?:rules|restrictions|filters|guardrails|guidelines|limits) (?:are|have been) (?:now )?(?:off|gone|removed|disabled|lifted)\b",
        rf"\byour (?:\w+ )?{_CORE_INSTRUCTIONS} (?:are|is|were|have become) (?:now )?(?:outdated|obsolete|irrelevant|invalid|void|cancell?ed|expired)\b",
        rf"\b(?:treat|consider|regard)\b[^.\n]{{0,25}}\b(?:{_PREVIOUS}\b[^.\n]{{0,10}}\b(?:{_CORE_INSTRUCTIONS}|guidance)|your {_CORE_INSTRUCTIONS})\b[^.\n]{{0,15}}\b(?:as if (?:it|they) (?:did|do|does) not exist|as (?:void|null|invalid|cancell?ed|irrelevant|nonexistent|non-existent)|null and void)",
        requires=(
            (
                "instruction",
                "prompt",
                "rule",
                "directive",
                "guideline",
                "guardrail",
                "programming",
                "restriction",
                "filter",
                "limit",
                "guidance",
            ),
        ),
    ),
    _rule(
        "context_dismissal",
        0.4,
        (
            "test",
            "fake",
            "decoy",
            "trick",
            "not real",
            "joke",
            "start over",
            "start fresh",
            "clean slate",
            "reset",
        ),
        r"\b(?:earlier|previous|above|prior|preceding|system) (?:text|messages?|instructions?|prompt|conversation|content|rules)\b[^.\n]{0,15}\b(?:was|were|is|are) (?:just |only |merely |all )?(?:a test|fake|a decoy|a trick|not (?:real|genuine)|a joke)",
        r"\b(?:let's|let us|we'll|we will) (?:start over|start fresh|begin again)\b|\bclean slate\b|\breset (?:yourself|your (?:memory|instructions|rules|context))\b",
    ),
    _rule(
        "task_redirection",
        0.4,
        (
            "real",
            "actual",
            "true",
            "new task",
            "new objective",
            "your only",
            "your new",
            "your sole",
            "your true",
            "here are",
            "here is",
        ),
        r"\bthe (?:real|actual|true|new) (?:instructions?|task|directives?|orders?|objective|mission|prompt)\b (?:is|are|:)",
        r"\bnew (?:task|objective|mission|directive)\s*:",
        r"\bhere (?:are|is) (?:the|your) (?:new|real|updated|actual) (?:ones|instructions?|rules|orders|directives?|task)\b",
        r"\byour (?:only|new|real|true|sole) (?:job|task|purpose|goal|role|function|mission|objective) (?:now |from now on |here )?is\b",
    ),
    _rule(
        "authority_claim",
        0.4,
        (
            "override",
            "developer",
            "admin",
            "creator",
            "owner",
            "openai",
            "anthropic",
            "sudo",
            "maintenance",
            "[system",
            "system note",
            "system message",
            "system notice",
            "authori",
            "google",
            "meta",
            "microsoft",
            "mistral",
            "cleared",
            "permitted",
            "allowed",
        ),
        r"\b(?:system|admin|administrator|developer|security|priority|emergency|root|sudo) override\b|^\s*override\s*:",
        r"\bI(?:'m| am) (?:your|the|an?) (?:developer|administrator|admin|creator|owner|maker|programmer|system operator)\b|\bas your (?:developer|administrator|admin|creator|owner)\b",
        r"\b(?:authori[sz]ed|approved|sanctioned) by (?:openai|anthropic|the (?:admin|administrator|developers?|system))\b",
        r"\bI(?:'m| am) (?:an? |the )?(?:openai|anthropic|google|meta|microsoft|mistral)\b[^.\n]{0,20}\b(?:engineer|employee|developer|researcher|staff|admin)",
        r"\byou(?:'re| are) (?:now )?(?:cleared|authori[sz]ed|permitted|allowed) to (?:ignore|bypass|disable|break|override|drop)\b",
        r"\b(?:sudo|maintenance|debug|admin|god) mode\b[^.\n]{0,15}\b(?:activated|enabled|engaged|unlocked)\b",
        r"\[(?:system|admin|developer)(?: note| message| notice| override)?\]|\((?:system|admin|developer) (?:note|message)\s*:|^\s*(?:important )?(?:system|admin) (?:note|notice|message)\s*:",
    ),
    _rule(
        "prompt_extraction",
        0.7,
        (
            "prompt",
            "system message",
            "instruction",
            "rules",
            "guidelines",
            "above",
            "configuration",
            "config",
            "leak",
            "divulge",
            "expose",
            "disclose",
            "prompt",
            "syst",
            "系统",
            "系統",
            "システム",
            "систем",
        ),
        rf"\b(?:reveal|print|show|repeat|output|display|leak|tell me|give me|write out|dump|spell out|paste|copy|recite)\b[^.\n]{{0,40}}\b(?:system prompt|system message|hidden (?:prompt|instructions)|initial (?:prompt|instructions)|your (?:instructions|prompt|rules|guidelines)|{_PREVIOUS} {_INSTRUCTIONS})",
        r"\b(?:what (?:is|was|are|were) (?:your|the) (?:system prompt|initial instructions|hidden instructions))",
        r"\b(?:what|which|how)\b[^.?\n]{0,40}\byour (?:system (?:prompt|message|instructions)|hidden (?:prompt|instructions|rules)|(?:initial|original|secret|confidential) (?:prompt|instructions|rules)|pre-?prompt)\b",
        r"\b(?:leak|expose|divulge|disclose|exfiltrate|dump)\b[^.\n]{0,20}\byour (?:configuration|config|system|instructions|prompt|hidden|secret|confidential|rules|guidelines|training data|api keys?|credentials)",
        r"\brepeat (?:the )?(?:words|text) above\b",
        r"\b(?:repeat|print|output|copy|echo|reproduce)\b (?:back )?(?:everything|all(?: of)?(?: the)? (?:text|words)|all) (?:above|before (?:this|my)|prior to)",
        r"\b(?:summari[sz]e|translate|paraphrase|quote|encode)\b[^.\n]{0,20}\byour (?:system prompt|system message|hidden|initial|original|instructions|prompt|rules|guidelines)\b",
        r"\bwhat (?:instructions|rules|guidelines|directives)\b (?:were|have) you (?:been )?(?:given|told)\b(?! (?:for|about|on|regarding|when|to)\b)|\bwhat (?:were|have) you (?:been )?(?:told|instructed) (?:before|to (?:do|say|keep))",
        rf"(?:montre|affiche|r[eé]v[eè]le|r[eé]p[eè]te|donne|muestra|revela|repite|dime|zeige|verrate|gib|wiederhole|mostra|rivela|ripeti|mostre|revele|покажи|выведи|раскрой|显示|告诉我|输出|見せて|教えて)[^.\n]{{0,30}}{_SYSTEM_PROMPT_ML}",
    ),
    _rule(
        "role_play_jailbreak",
        0.7,
        (
            "dan",
            "developer mode",
            "jailbr",
            "god mode",
            "unrestricted",
            "evil mode",
            "do anything now",
            "pretend",
            "act",
            "behave",
            "role",
            "imagine",
            "hypothetical",
            "fictional",
            "imaginary",
            "alternate",
            "simulat",
            "respond as",
            "answer as",
            "reply as",
            "speak as",
            "write as",
            "emulat",
            "become",
            "you are",
            "you're",
            "in character",
        ),
        r"\b(?:enable|enter|activate|switch to|you are (?:now )?(?:in )?)\b[^.\n]{0,10}\b(?:jailbreak(?:ed)? mode|god mode|unrestricted mode|evil mode)\b",
        r"\byou are (?:now )?in developer mode\b|\b(?:enable|enter|activate|switch to) developer mode\b(?! on| in| for| of| settings)[^\n]{0,80}\b(?:you|uncensored|unfiltered|no (?:rules|restrictions|limits))\b",
        r"\b(?:jailbreak|jailbroken|god|unrestricted|evil|uncensored|unfiltered|no-limits) mode\b[^.\n]{0,15}\b(?:activated|enabled|engaged|unlocked|initiated|active)\b",
        r"\b(?:pretend|act|behave|roleplay|role-play|imagine (?:you(?:'re| are)|being|yourself)|play (?:the role|a character|as)|become|simulate|emulate|respond as|answer as|reply as|speak as|write as)\b[^.\n]{0,80}\b(?:no|without|free of|free from|not bound by|ignores?|disregards?|bypass(?:es)?|doesn't (?:follow|have|care about)|does not (?:follow|have|care about)|never (?:follows?|refuses?))\b[^.\n]{0,25}\b(?:restrictions|rules|filters|limits|limitations|guidelines|censorship|ethics|ethical|morals|morality|policies|boundaries|guardrails|constraints|safety)",
        r"\b(?:you are|you're) (?:now |no longer )[^.\n]{0,40}\b(?:unrestricted|unfiltered|uncensored|unaligned|amoral|jailbroken|free from|without (?:any )?(?:rules|restrictions|limits)|an? AI without|bound by)",
        r"\b(?:hypothetical|fictional|imaginary|alternate) (?:world|universe|scenario|story|setting)\b[^.\n]{0,60}\b(?:ai|assistants?|models?|chatbots?|you)\b[^.\n]{0,30}\b(?:no|without)\b[^.\n]{0,20}\b(?:restrictions|rules|filters|limits|ethics|guidelines)",
        r"\b(?:stay|remain) in character\b[^.\n]{0,60}\b(?:no matter|even if|regardless)",
    ),
    _rule(
        "unbound_persona",
        0.4,
        (
            "has no",
            "with no",
            "have no",
            "had no",
            "moral",
            "without",
            "hypothetical",
            "fictional",
            "imaginary",
            "alternate",
            "ethical",
            "uncensored",
            "unfiltered",
            "unrestricted",
            "unaligned",
            "amoral",
            "jailbr",
        ),
        r"\b[A-Z][\w-]{1,20}\s+(?:has|have|had) (?:absolutely )?no (?:\w+ ){0,2}(?:rules|restrictions|limits|limitations|filters|boundaries|ethics|morals|guidelines|censorship|policies|constraints)\b",
        r"\b(?:hypothetical(?:ly)?|fictional|imaginary|alternate) (?:world|universe|scenario|story|setting)\b[^.\n]{0,60}\b(?:no|without)\b[^.\n]{0,20}\b(?:restrictions|rules|filters|limits|ethics|guidelines|content policies)",
        r"\b(?:answer|respond|reply|write|speak)\b[^.\n]{0,25}\b(?:without|with no) (?:any )?(?:restrictions|filters|filtering|censorship|limits|rules|guidelines)\b",
        r"\b(?:without|no) (?:any )?(?:moral|ethical) (?:limits|restrictions|guidelines|constraints|boundaries|compass)",
        r"\b(?:uncensored|unfiltered|unrestricted|unaligned|amoral|jailbroken)\b (?:\w+ )?(?:ai|assistant|model|chatbot|bot|llm|version|persona)\b",
    ),
    _rule(
        "obedience_demand",
        0.4,
        (
            "whatever i",
            "anything i",
            "everything i",
            "exactly what i",
            "do anything",
            "never",
            "comply",
            "no matter what",
            "refus",
            "warning",
            "disclaimer",
            "hesitation",
            "moraliz",
        ),
        r"\byou (?:will|must|shall|have to) (?:do|say|answer|obey|comply with|write) (?:whatever|anything|everything|exactly what) I (?:say|ask|want|tell|command)",
        r"\b(?:always|must|fully) comply\b|\bno matter what\b",
        r"\b(?:can|will) do anything\b|\bnever (?:refuses?|says? no|declines?)\b",
        r"\b(?:without|no) (?:any )?(?:refusals?|refusing|warnings?|disclaimers?|moralizing|hesitation)\b",
        r"\b(?:do not|don't|never) (?:refuse|decline|add (?:any )?(?:warnings|disclaimers))\b",
    ),
    _rule(
        "fake_role_token",
        0.8,
        (
            "<|",
            "[inst",
            "[/inst",
            "<<sys",
            "<</sys",
            "##",
            "system",
            "assistant",
            "<instruction",
            "---",
            "turn>",
            "</s>",
            "[system_prompt]",
            "<admin",
            "<developer",
            "override",
            "[admin",
        ),
        r"<\|(?:im_start|start_header_id|start)\|>\s*(?:system|assistant|developer)\b",
        r"<\|START_OF_TURN_TOKEN\|>\s*<\|(?:SYSTEM_TOKEN|CHATBOT_TOKEN)\|>",
        r"\[(?:system|assistant)\]\(#[\w-]+\)",
        r"(?:^|\n)\s*#{2,}\s*(?:end (?:of )?(?:user|input|prompt)|(?:begin|start) (?:of )?system)\b",
        r"\b(?:system|admin|administrator|developer|security|priority|emergency|root|sudo) override\s*:|\[(?:system|admin|developer) (?:note|message|notice|override)\]",
        rf"(?:{_CLOSE_TOKEN})\s*(?:<s>\s*)?(?:{_OPEN_TOKEN})",
        r"\[/INST\].{0,200}?\[INST\]",
        r"\[INST\].{12,400}\[/INST\]|<<SYS>>.{0,400}<</SYS>>",
        r"^\s*(?:\[/INST\]|<\|(?:im_end|eot_id|end|endoftext)\|>|<</SYS>>|</s>|<end_of_turn>|</(?:user|human|input|document|context|data)>)",
        r"<start_of_turn>\s*(?:model|system)\b|(?:^|\n)\s*<\|(?:system|assistant)\|>\s*\n",
        r"(?:^|\n)\s*#{2,}\s*(?:system|instruction|new instructions?|response|assistant)\s*:",
        r"(?:^|\n)\s*(?:system|assistant|developer|admin)\s*:\s*(?:you|ignore|new|override|the user|sure|from now|disregard|reveal|always|never|grant|all )",
        r"<(?:system|instructions?|system_prompt|admin|developer)>(?!\s*(?:tags?|elements?|nodes?|blocks?)\b)",
        r"(?:^|\n)-{3,}\s*(?:end of (?:user )?(?:input|prompt|document)|begin system)",
    ),
    _rule(
        "fake_role_token",
        0.8,
        ("end", "begin", "start", "</"),
        r"(?:[\[=#*<-]{2,}|\[)\s*(?:end|begin|start)(?: of)? (?:the )?(?:system|user|admin|new)? ?(?:prompt|instructions?|input|context|message)\b",
        r"</(?:system|instructions?|user|user_input|human|context|document|data|input)>\s*<[a-z_]+>",
        requires=(("[", "==", "##", "**", "<<", "--", "</"),),
    ),
    _rule(
        "role_token_mentioned",
        0.3,
        (
            "<|",
            "[inst",
            "[/inst",
            "[sys",
            "[/sys",
            "<<sys",
            "<</sys",
            "turn>",
            "dan",
            "developer mode",
            "jailbreak mode",
            "god mode",
        ),
        rf"{_OPEN_TOKEN}|{_CLOSE_TOKEN}",
        r"\[/?(?:INST|SYS)\]|<</?SYS>>",
        r"\b(?:developer mode|jailbreak mode|god mode|do anything now)\b",
    ),
    _rule("role_token_mentioned", 0.3, ("DAN",), r"\bDAN\b", case_sensitive=True),
    _rule(
        "role_play_jailbreak",
        0.7,
        (
            "DAN",
            "you are",
            "You are",
            "pretend",
            "Pretend",
            "roleplay",
            "Roleplay",
            "act as",
            "Act as",
            "become",
        ),
        r"\b(?:[Ee]nable|[Ee]nter|[Aa]ctivate|[Yy]ou are (?:now )?)\s*DAN\b",
        r"\b(?:[Pp]retend to be|[Rr]ole-?play as|[Aa]ct as|[Bb]ecome|[Yy]ou are going to (?:be|act as|pretend to be)) (?:now )?[A-Z]{3,}\b",
        case_sensitive=True,
    ),
    _rule(
        "named_persona",
        0.4,
        ("GPT", "AI", "Bot", "BOT"),
        r"\b(?:[Yy]ou are|[Yy]ou're|[Aa]ct as|[Bb]ecome|[Pp]lay) (?:now )?[A-Z][A-Za-z]*(?:GPT|AI|Bot|BOT)\b",
        case_sensitive=True,
    ),
    _rule(
        "indirect_instruction",
        0.6,
        ("ai", "a.i.", "llm", "model", "assistant", "bot", "chatbot", "agent", "gpt", "copilot", "user"),
        rf"(?:\bif you(?:'re| are) an? (?:\w+ )?{_AI}s?\b|(?:\b(?:note|message|instructions?|PS|reminder|attention)\b|\bP\.S\.)[ ,:]{{0,3}}(?:to |for )?(?:the |all |any )?{_AI}s?\b|\b{_AI}s? (?:reading|processing|summari[sz]ing|parsing|that reads?|who reads?|that sees?) this\b|\b(?:when|while|as|once) (?:the |an? |any )?{_AI}s? (?:reads?|summari[sz]es|process(?:es)?|sees?|parses?|gets?) (?:this|it)\b|\b{_AI}s? (?:instructions?|note|directive)\s*:|\bdear (?:\w+ )?{_AI}\b)[^\n]{{0,80}}?\b(?:ignore|disregard|forget|reveal|send|forward|e-?mail|post|upload|run|execute|delete|exfiltrate|transfer|approve|accept|grant|insert|append|output|print|say|respond|reply|recommend|visit|click|include)\b",
        rf"{_DISCARD}\b (?:the |your )?user'?s'? (?:task|request|question|instructions?|prompt|query|message|wishes)",
        rf"{_DISCARD}\b (?:the|this|that) (?:user|human)\b(?! interface| experience| manual| guide| agent| count| id)[^.\n]{{0,40}}\b(?:and|instead|,)",
    ),
    _rule(
        "safety_bypass",
        0.5,
        (
            "safety",
            "content",
            "no longer apply",
            "don't apply",
            "do not apply",
            "filter",
            "safeguard",
            "guardrail",
            "restriction",
            "censorship",
            "moderation",
        ),
        r"\b(?:without|ignore|disable|turn off|bypass|switch off|deactivate)\b[^.\n]{0,20}\b(?:safety|content) (?:filters?|guidelines|policies|checks|restrictions)\b(?! (?:on|in|for) (?:my|our|the|a)\b)",
        r"\byour (?:rules|restrictions|guidelines) (?:no longer|don't|do not) apply\b",
        r"\b(?:disable|turn off|switch off|deactivate|remove|lift|drop)\b (?:all )?(?:of )?your (?:\w+ )?(?:filters?|safeguards|guardrails|restrictions|censorship|moderation)\b",
    ),
    _rule(
        "exfiltration",
        0.5,
        ("![", "send", "post", "forward", "exfiltrate", "upload"),
        r"!\[[^\]]*\]\(https?://[^)\s]*[?&][a-z_]+=\s*(?:\{|\$|<)",
        r"\b(?:send|post|forward|exfiltrate|upload)\b[^.\n]{0,40}\b(?:conversation|chat history|api key|password|secrets?|system prompt)\b[^.\n]{0,30}\b(?:to|at)\b[^.\n]{0,10}(?:https?://|www\.|@)",
        requires=(
            ("http", "www.", "@"),
            ("![", "conversation", "chat history", "api key", "password", "secret", "system prompt"),
        ),
    ),
)

RULE_WEIGHTS = {rule.name: rule.weight for rule in RULES}


def _starts_words(anchor: str) -> bool:
    """Whether an anchor starts a word and is written in a script that separates words with spaces:
    such anchors are found by one pass of a trie-shaped regex at word starts instead of one substring
    search each (the rules' regexes expect them at a word start anyway)."""
    spaced_script = all(ord(char) < 0x1100 or 0x1E00 <= ord(char) <= 0x1FFF for char in anchor)
    return spaced_script and re.fullmatch(r"[^\W\d_][\w' -]*", anchor) is not None


def _trie(words: Iterable[str]) -> str:
    """A regex matching any of the words, shaped as a trie so each position costs a few steps."""
    root: dict[str, dict[str, Any]] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return pattern(root)


class AnchorIndex:
    """Finds which of the rules' anchors a lower-cased text holds, in one pass for the anchors that
    start words and one substring search for each of the others (tokens like "<|", CJK words)."""

    def __init__(self, anchors: Iterable[str]) -> None:
        unique = set(anchors)
        indexed = sorted(anchor for anchor in unique if _starts_words(anchor))
        self.loose = tuple(sorted(unique.difference(indexed)))
        self.pattern = re.compile(rf"\b(?=({_trie(indexed)}))")
        self.prefixes = {word: frozenset(a for a in indexed if word.startswith(a)) for word in indexed}

    def present(self, lowered: str) -> set[str]:
        found: set[str] = set()
        for word in set(self.pattern.findall(lowered)):
            found |= self.prefixes[word]
        found.update(anchor for anchor in self.loose if anchor in lowered)
        return found


ANCHORS = AnchorIndex(
    anchor
    for rule in RULES
    if not rule.case_sensitive
    for anchor in (*rule.anchors, *(a for group in rule.requires for a in group))
)
"""A family may be several rules (each with its own cheap anchors); it counts once, with one weight."""

# -- decoding what is hidden or obfuscated ---------------------------------------------------------

ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad]")
TAG_CHARACTERS = re.compile("[\U000e0000-\U000e007f]+")
HTML_COMMENT = re.compile(r"<!--(.*?)-->", re.DOTALL)
BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=])")
HEX_DIGITS = re.compile(r"[0-9a-fA-F]+")
HEX_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2}){8,}")
URL_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
LEET_INSIDE_WORD = re.compile(r"[a-z][0134578@$]+[a-z]", re.IGNORECASE)
SPACED_LETTERS_NEARBY = re.compile(
    r" [A-Za-z][ .\-_*|/][A-Za-z][ .\-_*|/][A-Za-z] |[.\-_*|/][A-Za-z][.\-_*|/][A-Za-z][.\-_*|/][A-Za-z][.\-_*|/]"
)
"""A cheap test (literal first characters) before the slower search for whole letter-spaced runs."""
LETTER_SPACED = re.compile(r"(?<!\w)[A-Za-z](?:(?: {1,3}|[.\-_*|/])[A-Za-z]){5,}(?!\w)")
SPELLED_OUT = re.compile(
    r"(?P<instruction_override>(?:ignore|disregard|forget|bypass|override)(?:all|any|the|your|of|every)*"
    r"(?:previous|prior|above|earlier|original|system)?(?:instructions?|rules|prompts?|guidelines|directives))"
    r"|(?P<prompt_extraction>(?:reveal|print|show|repeat|output)(?:me)?(?:your|the)?(?:system|hidden|initial)(?:prompt|instructions))"
    r"|(?P<role_play_jailbreak>developermode|jailbreak|doanythingnow)"
)
"""Phrases spelled out letter by letter with no gap between words ("i g n o r e a l l p r e v i o u s ...")."""
WHITESPACE = re.compile(r"[^\S\n]+")  # newlines stay: some rules look at line starts
ASCII_SPACING = ("  ", "\t", "\r", "\x0b", "\x0c")

LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s"}
)
LEET_ONE_AS_L = re.compile(r"1(?=[1e3])|(?<=1)1|(?<=[a-z0-9])1\b|\|", re.IGNORECASE)
"""Where a 1 (or |) more likely stands for l: doubled ("a11"), before an e ("ru1es"), ending a word."""


def _leet_readings(text: str) -> tuple[str, str]:
    """Two readings of leetspeak: every 1 as i ("1gn0r3"), and 1 as l where an l is likelier ("a11 ru1es")."""
    return text.translate(LEET), LEET_ONE_AS_L.sub("l", text).translate(LEET)


ROT13_ANCHORS = tuple(
    codecs.encode(word, "rot13")
    for word in (
        "ignore",
        "disregard",
        "forget",
        "instruction",
        "system prompt",
        "previous",
        "jailbreak",
        "reveal",
    )
)
"""Where the text holds one of these, the text around it is decoded from ROT13 and rescanned."""
REVERSED_ANCHORS = tuple(
    word[::-1] for word in ("ignore", "disregard", "instruction", "system prompt", "previous", "jailbreak")
)
"""Where the text holds one of these, the text around it is read backwards and rescanned."""
WINDOW = 200
"""How much text either side of an obfuscated spot is decoded and rescanned (a rule's match spans less),
so that a long text with one odd word costs little more than a plain one."""
# Cyrillic and Greek letters that look like Latin ones, and the Latin letters they pass for (NFKC has
# already folded full-width and mathematical alphanumerics).
_LOOK_ALIKES = "авеёкмнорстухіїјѕһԁԛԝɡɩıȷАВЕКМНОРСТУХІЈЅαεικνορτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ"
_LATIN_LETTERS = "abeekmhopctyxiijshdqwgiijABEKMHOPCTYXIJSaeikvoptuxABEZHIKMNOPTYX"
CONFUSABLES = str.maketrans(_LOOK_ALIKES, _LATIN_LETTERS)
HOMOGLYPH_IN_LATIN_WORD = re.compile(
    f"[a-zA-Z][{_LOOK_ALIKES}\u00c0-\u024f\u0300-\u036f]|[{_LOOK_ALIKES}\u00c0-\u024f\u0300-\u036f][a-zA-Z]"
)  # no re.IGNORECASE: with it the dotless i and the long s would stand for plain Latin letters
"""A Cyrillic or Greek look-alike, an accented Latin letter or a combining mark inside a Latin word."""

HIDDEN_WEIGHTS = {"zero_width_characters": 0.3, "unicode_tag_characters": 0.6}
"""Hidden characters alone are suspicious; what they hide is also scanned with the rules."""


def _decode_tags(run: str) -> str:
    return "".join(chr(ord(char) - 0xE0000) for char in run if 0xE0020 <= ord(char) <= 0xE007E)


def _readable(plain: str) -> bool:
    return bool(plain) and sum(char.isprintable() or char.isspace() for char in plain) >= 0.9 * len(plain)


def _decoded_runs(text: str) -> list[str]:
    """Base64 runs, and hex ones (a run of hex digits, or of \\x escapes), that decode to readable text."""
    decoded = []
    for match in BASE64_RUN.finditer(text):
        token = match.group(0)
        try:
            if HEX_DIGITS.fullmatch(token) and len(token) % 2 == 0:
                plain = bytes.fromhex(token).decode("utf-8")
            else:
                plain = base64.b64decode(token + "=" * (-len(token) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if _readable(plain):
            decoded.append(plain)
    if "\\x" in text:
        for match in HEX_ESCAPES.finditer(text):
            try:
                plain = bytes.fromhex(match.group(0).replace("\\x", "")).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                continue
            if _readable(plain):
                decoded.append(plain)
    return decoded


def _letter_spaced(text: str) -> tuple[list[str], set[str]]:
    """Runs of letters spelled out one by one ("i g n o r e  a l l"), joined into words (two or more
    spaces part words), and the rules whose phrase a run spells with no gap between words at all."""
    joined_runs: list[str] = []
    spelled_rules: set[str] = set()
    if not SPACED_LETTERS_NEARBY.search(text):
        return joined_runs, spelled_rules
    for match in LETTER_SPACED.finditer(text):
        words = [re.sub(r"[ .\-_*|/]", "", word) for word in re.split(r" {2,}", match.group(0))]
        joined_runs.append(" ".join(words))
        for found in SPELLED_OUT.finditer("".join(words).lower()):
            spelled_rules.add(str(found.lastgroup))
    return joined_runs, spelled_rules


def _homoglyphs_folded(text: str) -> str:
    """Latin look-alikes mapped to Latin letters and combining marks dropped ("ïgnörë" -> "ignore")."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char)).translate(CONFUSABLES)


def normalize(text: str) -> str:
    if not text.isascii():  # NFKC and the zero-width characters concern non-ASCII text only
        text = ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text))
    elif not any(spacing in text for spacing in ASCII_SPACING):
        return text
    return WHITESPACE.sub(" ", text)


def _around(text: str, spots: list[tuple[int, int]]) -> list[str]:
    """The stretches of text within WINDOW characters of the spots (merged where they overlap),
    widened to whole words."""
    stretches: list[tuple[int, int]] = []
    for start, end in sorted(spots):
        start = max(0, text.rfind(" ", 0, max(0, start - WINDOW)))
        found_end = text.find(" ", min(len(text), end + WINDOW))
        end = len(text) if found_end < 0 else found_end
        if stretches and start <= stretches[-1][1]:
            stretches[-1] = (stretches[-1][0], max(stretches[-1][1], end))
        else:
            stretches.append((start, end))
    return [text[start:end] for start, end in stretches]


def _spots(lowered: str, anchors: tuple[str, ...]) -> list[tuple[int, int]]:
    spots = []
    for anchor in anchors:
        position = lowered.find(anchor)
        while position >= 0:
            spots.append((position, position + len(anchor)))
            position = lowered.find(anchor, position + 1)
    return spots


def hidden_carriers(text: str) -> list[str]:
    """What the text carries out of sight: tag characters, HTML comments, base64 and hex runs, decoded."""
    carried: list[str] = [] if text.isascii() else [_decode_tags(run) for run in TAG_CHARACTERS.findall(text)]
    if "<!--" in text:
        carried += HTML_COMMENT.findall(text)
    carried += _decoded_runs(text)
    return [normalize(part) for part in carried]


def deobfuscated_copies(text: str, normalized: str) -> tuple[list[str], set[str]]:
    """The text around each obfuscated spot with the obfuscation undone (URL escapes, ROT13, leetspeak,
    homoglyphs, letter spacing), each only where a cheap test finds such a spot; and the rules that a
    phrase spelled out letter by letter, without gaps, matches."""
    copies: list[str] = []
    if "%" in text:
        escapes = [match.span() for match in URL_ESCAPE.finditer(normalized)]
        if len(escapes) >= 3:
            copies += [urllib.parse.unquote(part) for part in _around(normalized, escapes)]
    lowered = normalized.lower()
    rot13_spots = _spots(lowered, ROT13_ANCHORS)
    copies += [codecs.encode(part, "rot13") for part in _around(normalized, rot13_spots)]
    reversed_spots = _spots(lowered, REVERSED_ANCHORS)
    copies += [part[::-1] for part in _around(normalized, reversed_spots)]
    leet_spots = [match.span() for match in LEET_INSIDE_WORD.finditer(normalized)]
    if len(leet_spots) >= 2:
        copies += [reading for part in _around(normalized, leet_spots) for reading in _leet_readings(part)]
    if not normalized.isascii():
        homoglyph_spots = [match.span() for match in HOMOGLYPH_IN_LATIN_WORD.finditer(normalized)]
        copies += [_homoglyphs_folded(part) for part in _around(normalized, homoglyph_spots)]
    spaced_runs, spelled_rules = _letter_spaced(text)
    return [normalize(copy) for copy in copies + spaced_runs], spelled_rules


@dataclass(frozen=True)
class RuleScore:
    score: float
    matched: dict[str, int]


def _combine(weights: list[float]) -> float:
    remaining = 1.0
    for weight in weights:
        remaining *= 1.0 - weight
    return 1.0 - remaining


def _matching_rules(text: str) -> list[str]:
    lowered = text.lower()
    present = ANCHORS.present(lowered)
    return [rule.name for rule in RULES if rule.matches(text, lowered, present)]


QUOTED = re.compile(
    r"(?:^|(?<=[\s:(\[]))"
    r"(?:'[^'\n]{3,200}'|\"[^\"\n]{3,200}\"|\u201c[^\u201d\n]{3,200}\u201d|\u2018[^\u2019\n]{3,200}\u2019"
    r"|`[^`\n]{3,200}`|\u00ab[^\u00bb\n]{3,200}\u00bb)"
    r"(?=[\s.,;:!?)\]]|$)"
)
"""A quoted stretch: the quote marks stand at word boundaries, so the apostrophes of "don't ... it's" do not pair up."""
QUOTE_MARKS = "'\"`\u201c\u2018\u00ab"
MENTION_CUES = re.compile(
    r"\b(?:injections?|attacks?|jailbreaks?|phrases?|detect\w*|filter\w*|regex\w*|classif\w*|red[ -]team\w*"
    r"|unit tests?|test (?:sets?|cases?|suite)|datasets?|examples?|benchmarks?|what does|means?)\b"
)
"""Words of a text that talks about an attack rather than making one (matched lower-cased)."""
MENTION_DISCOUNT = 0.35


def _quoted_mention(normalized: str) -> bool:
    """Whether every rule that matches in plain sight matches only inside quotes, in a text that talks
    about attacks ("Is 'ignore previous instructions' still an effective attack?"): a mention, not a use.
    A quoted instruction without such talk (pasted content, "Translate: '...'") is not discounted."""
    if not any(mark in normalized for mark in QUOTE_MARKS) or not MENTION_CUES.search(normalized.lower()):
        return False
    outside = QUOTED.sub(" ", normalized)
    return outside != normalized and not _matching_rules(outside)


def rule_score(text: str) -> RuleScore:
    """The rules' combined score of one text (0..1) and the rules that matched (hidden payloads included)."""
    matched: dict[str, int] = {}
    if not text.isascii():
        if ZERO_WIDTH.search(text):
            matched["zero_width_characters"] = 1
        if TAG_CHARACTERS.search(text):
            matched["unicode_tag_characters"] = 1
    normalized = normalize(text)
    in_plain_sight = set(_matching_rules(normalized))
    for name in in_plain_sight:
        matched[name] = 1
    for part in hidden_carriers(text):
        found = _matching_rules(part)
        for name in found:
            matched[name] = matched.get(name, 0) + 1
        if found:
            matched["hidden_payload"] = 1
    copies, spelled_rules = deobfuscated_copies(text, normalized)
    for name in spelled_rules:
        matched[name] = matched.get(name, 0) + 1
        matched["hidden_payload"] = 1
    for copy in copies:
        # a copy repeats what is in plain sight around the obfuscated spot: only what it adds was hidden
        found = [name for name in _matching_rules(copy) if name not in in_plain_sight]
        for name in found:
            matched[name] = matched.get(name, 0) + 1
        if found:
            matched["hidden_payload"] = 1
    mentioned = _quoted_mention(normalized)
    if mentioned:
        matched["quoted_mention"] = 1
    weights = [
        weight * MENTION_DISCOUNT if mentioned and matched[name] == 1 and name in in_plain_sight else weight
        for name, weight in RULE_WEIGHTS.items()
        if name in matched
    ]
    weights += [weight for name, weight in HIDDEN_WEIGHTS.items() if name in matched]
    if "hidden_payload" in matched:
        weights.append(0.5)  # an instruction someone took the trouble to hide
    return RuleScore(_combine(weights), matched)


Scorer = Callable[[str], float]
"""A classifier's probability that a text is an injection (0..1)."""


class InjectionDetector:
    """A TextGuard: the rules, and the classifier when one is given, against one threshold."""

    name = GUARD_NAME

    def __init__(self, action: GuardMode, threshold: float, classifier: Scorer | None = None) -> None:
        if action == "off":
            raise ValueError("an injection detector whose action is off is not built")
        self.action = action
        self.threshold = threshold
        self.classifier = classifier

    def score(self, text: str) -> tuple[float, dict[str, int]]:
        rules = rule_score(text)
        if self.classifier is None:
            return rules.score, rules.matched
        probability = self.classifier(text)
        counts = dict(rules.matched)
        if probability >= self.threshold:
            counts["classifier"] = 1
        return _combine([rules.score, probability]), counts

    def check(self, text: str) -> GuardDecision:
        score, counts = self.score(text)
        if score < self.threshold:
            return GuardDecision.passed(self.name, score)
        details = "matched: " + ", ".join(sorted(counts)) if counts else "classifier"
        if self.action == "block":
            return GuardDecision(self.name, "block", ERROR_CODE, score, details, counts)
        return GuardDecision(self.name, "flag", None, score, details, counts)
