"""Policies compiled once per configuration snapshot, and applied to one request or response.

`compile_policies` turns every `Policy` resource into a `CompiledPolicy`: its selector, its
request rules, and per side (request, response) one `PhraseMatcher` over the phrases of all its
word rules, each phrase remembering which rules own it. At request time `check_request` and
`scan` run the matchers over the texts of `texts.py` and return what happened as data: a
refusal naming the policy and rule (never the matched text), whether the body changed
(redaction), and the hits to report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from extproc.core.policy.matching import IndexFactory, PhraseMatcher, fold, redact
from extproc.core.policy.rules import RuleFacts, broken_rule
from extproc.core.policy.texts import Slot
from extproc.core.policy.wordlists import shipped
from extproc.core.quota import Selector, Subject
from extproc.core.values import value_type

REQUEST, RESPONSE = "request", "response"
POLICY_HEADER = "x-tollgate-policy"


@dataclass(frozen=True, slots=True)
class WordRule:
    name: str
    action: str  # block | audit | redact
    sides: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SideMatcher:
    matcher: PhraseMatcher
    owners: tuple[tuple[int, ...], ...]  # per phrase: indexes of the rules that list it


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    id: str
    selector: Selector
    redaction: str
    rules: tuple[WordRule, ...]
    request_rules: dict[str, Any]
    sides: dict[str, SideMatcher]
    replies: tuple[tuple[str, str], ...] = ()  # (name, reply text) of each auto-reply
    reply_matcher: SideMatcher | None = None  # phrases -> indexes into `replies`
    reflection: dict[str, Any] | None = None  # {action, delimiter, minChars} unless none
    forward_headers: dict[str, list[str]] | None = None  # {allow, deny} when either is set
    log_bodies: bool = False  # opt-in: request and response bodies to the log stream
    moderation: dict[str, Any] | None = None  # {action, categories, model, ...} when set


@value_type
class Hit:
    """One rule that acted on one side of one request, and how many matches it had."""

    policy: str
    rule: str
    action: str
    side: str
    count: int

    def result(self) -> dict[str, object]:
        return {"policy": self.policy, "rule": self.rule, "action": self.action,
                "side": self.side, "count": self.count}


@value_type
class Refusal:
    policy: str
    rule: str
    reason: str  # never contains matched text


@value_type
class ScanResult:
    hits: tuple[Hit, ...] = ()
    blocked: Refusal | None = None
    changed: bool = False


def _side_matcher(rules: Sequence[tuple[WordRule, Sequence[str]]], side: str,
                  factory: IndexFactory | None) -> SideMatcher | None:
    owners: dict[str, list[int]] = {}
    for index, (rule, phrases) in enumerate(rules):
        if side not in rule.sides:
            continue
        for phrase in phrases:
            key = " ".join(fold(phrase).split())
            if index not in owners.setdefault(key, []):
                owners[key].append(index)
    if not owners:
        return None
    phrases = list(owners)
    return SideMatcher(PhraseMatcher(phrases, factory), tuple(tuple(owners[p]) for p in phrases))


def compile_policy(policy_id: str, selector: Selector, spec: dict[str, Any],
                   factory: IndexFactory | None = None) -> CompiledPolicy:
    compiled: list[tuple[WordRule, Sequence[str]]] = []
    for raw in spec.get("wordLists", ()):
        side = raw.get("on", "both")
        sides = (REQUEST, RESPONSE) if side == "both" else (side,)
        phrases = [*raw.get("words", ()), *(p for name in raw.get("lists", ())
                                            for p in shipped(name))]
        compiled.append((WordRule(raw["name"], raw["action"], sides), phrases))
    matchers = {side: m for side in (REQUEST, RESPONSE)
                if (m := _side_matcher(compiled, side, factory)) is not None}
    auto = [(WordRule(r["name"], "reply", (REQUEST,)), r["phrases"])
            for r in spec.get("autoReplies", ())]
    return CompiledPolicy(
        id=policy_id, selector=selector, redaction=spec.get("redaction", "****"),
        rules=tuple(rule for rule, _ in compiled),
        request_rules=dict(spec.get("requestRules") or {}), sides=matchers,
        replies=tuple((r["name"], r["reply"]) for r in spec.get("autoReplies", ())),
        reply_matcher=_side_matcher(auto, REQUEST, factory),
        log_bodies=bool(spec.get("logBodies")),
        moderation=spec.get("moderation") or None,
        forward_headers=(spec.get("forwardHeaders") if any(
            (spec.get("forwardHeaders") or {}).values()) else None),
        reflection=(spec.get("reflection") if (spec.get("reflection") or {}).get(
            "action", "none") != "none" else None))


def reflection_policies(policies: Iterable[CompiledPolicy],
                        slots: Sequence[Slot]) -> tuple[tuple[CompiledPolicy, ...], bool]:
    """Prompt reflection, per policy that asks for it: a response-side policy made for this
    request whose phrases are the prompt's texts (or the parts marked with the delimiter,
    which are unmarked in place), and whether a slot changed. Searched with the stdlib
    stand-in: a handful of phrases, built per request."""
    out = []
    changed = False
    for policy in policies:
        config = policy.reflection
        if config is None:
            continue
        delimiter, minimum = config.get("delimiter", ""), int(config.get("minChars", 20))
        phrases: list[str] = []
        for slot in slots:
            if delimiter:
                pieces = slot.text.split(delimiter)
                if len(pieces) < 3:
                    continue
                # odd pieces are marked: a||b||c -> b; an unclosed mark stays as sent
                closed = len(pieces) if len(pieces) % 2 else len(pieces) - 1
                phrases += [p for p in pieces[1:closed:2] if p.strip()]
                unmarked = "".join(pieces[:closed]) + delimiter.join(["", *pieces[closed:]])
                slot.replace(unmarked)
                changed = True
            elif len(slot.text.strip()) >= minimum:
                phrases.append(slot.text.strip())
        if phrases:
            rule = WordRule("reflection", config["action"], (RESPONSE,))
            matcher = _side_matcher([(rule, phrases)], RESPONSE, None)
            assert matcher is not None
            out.append(CompiledPolicy(policy.id, policy.selector, policy.redaction, (rule,),
                                      {}, {RESPONSE: matcher}))
    return tuple(out), changed


@value_type
class AutoReply:
    policy: str
    name: str
    text: str


def auto_reply(policies: Iterable[CompiledPolicy], slots: Sequence[Slot]) -> AutoReply | None:
    """The first auto-reply (in policy order, then configured order) whose phrase the request
    contains."""
    for policy in policies:
        if policy.reply_matcher is None:
            continue
        found = {i for slot in slots for m in policy.reply_matcher.matcher.find(slot.text)
                 for i in policy.reply_matcher.owners[m.phrase]}
        if found:
            name, text = policy.replies[min(found)]
            return AutoReply(policy.id, name, text)
    return None


def applicable(policies: Iterable[CompiledPolicy], subject: Subject) -> tuple[CompiledPolicy, ...]:
    return tuple(p for p in policies if p.selector.matches(subject))


def check_rules(policies: Iterable[CompiledPolicy], facts: RuleFacts) -> Refusal | None:
    for policy in policies:
        broken = broken_rule(policy.request_rules, facts)
        if broken is not None:
            return Refusal(policy.id, broken[0], broken[1])
    return None


def scan(policies: Iterable[CompiledPolicy], side: str, slots: Sequence[Slot]) -> ScanResult:
    """Run every policy's word rules for `side` over `slots`, redacting in place. A block
    stops at once (its policy's redactions are not applied: nothing will be sent)."""
    hits: list[Hit] = []
    changed = False
    for policy in policies:
        side_matcher = policy.sides.get(side)
        if side_matcher is None:
            continue
        counts = [0] * len(policy.rules)
        redactions: list[tuple[Slot, list[Any]]] = []
        for slot in slots:
            found = side_matcher.matcher.find(slot.text)
            to_redact = []
            for match in found:
                owners = side_matcher.owners[match.phrase]
                for index in owners:
                    counts[index] += 1
                if any(policy.rules[i].action == "redact" for i in owners):
                    to_redact.append(match)
            if to_redact:
                redactions.append((slot, to_redact))
        for index, count in enumerate(counts):
            rule = policy.rules[index]
            if count and rule.action == "block":
                return ScanResult(tuple(hits), Refusal(
                    policy.id, rule.name, f"the {side} matches word list '{rule.name}'"))
        for index, count in enumerate(counts):
            if count:
                rule = policy.rules[index]
                hits.append(Hit(policy.id, rule.name, rule.action, side, count))
        for slot, matches in redactions:
            slot.replace(redact(slot.text, matches, policy.redaction))
            changed = True
    return ScanResult(tuple(hits), None, changed)


def header_value(hits: Iterable[Hit]) -> str:
    """`x-tollgate-policy`: `policy/rule=action:count` per hit, comma-separated."""
    return ", ".join(f"{h.policy}/{h.rule}={h.action}:{h.count}" for h in hits)
