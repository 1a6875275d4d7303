"""Grades a caption of the shapes grammar against the true scene: the grounded metric.

A caption is *correct* when it parses, every fact it states is true and it names every object.
It is read like the tokenizer reads it (lower case, punctuation gone), so a model's output and a
reference caption are judged the same way. The grammar is the one `training/datasets/shapes.py` writes (see its
docstring) and parsing is strict about it, agreement included ("there is two circles", "a orange
square" and "a red circles" do not parse; "one" may open a relation's phrase and "and" may stand
for every comma, which the writer never does); anything that does not parse counts as wrong.

Meaning: each noun phrase claims its own objects — "two red circles" needs two red circles that no
other phrase claims — and the relation, if any, must hold between the objects of its two phrases.
Relations are judged leniently (`relation_holds(..., strict=False)`: a plain coordinate comparison
with a ~2 px dead zone), although the writer only states obvious ones.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from captioning.scenes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    plural,
    relation_holds,
)
from captioning.tokenizer import standardize  # the checker reads text as the model's tokenizer does

COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_RELATION_WORDS = {tuple(rel.split()): rel for rel in RELATIONS}
_SINGULAR = {shape: shape for shape in SHAPES}
_PLURAL = {plural(shape): shape for shape in SHAPES}


@dataclass(frozen=True)
class NounPhrase:
    count: int
    size: str | None
    colour: str
    shape: str

    def describe(self, plural_form: bool = False) -> str:
        noun = plural(self.shape) if plural_form else self.shape
        return " ".join(word for word in (self.size, self.colour, noun) if word)

    def matches(self, obj: ShapeObject) -> bool:
        return (obj.colour, obj.shape) == (self.colour, self.shape) and self.size in (None, obj.size)


@dataclass(frozen=True)
class ParsedCaption:
    phrases: tuple[NounPhrase, ...]
    relation: tuple[int, str, int] | None = None  # (phrase index, relation, phrase index)


@dataclass
class Verdict:
    parsed: bool
    false_facts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    error: str = ""  # why the caption did not parse

    @property
    def correct(self) -> bool:
        return self.parsed and not self.false_facts and not self.missing


# --------------------------------------------------------------------------------------- parsing


class _Tokens:
    """A cursor over the words of a caption; every `expect` failure is a parse error."""

    def __init__(self, words: list[str]):
        self.words, self.pos = words, 0

    def peek(self, ahead: int = 0) -> str | None:
        i = self.pos + ahead
        return self.words[i] if i < len(self.words) else None

    def take(self) -> str:
        word = self.peek()
        if word is None:
            raise ValueError("caption ends too early")
        self.pos += 1
        return word

    def accept(self, *words: str) -> bool:
        if tuple(self.words[self.pos : self.pos + len(words)]) == words:
            self.pos += len(words)
            return True
        return False


def parse_caption(caption: str) -> ParsedCaption:
    """Parse a caption; raises ValueError saying where it leaves the grammar."""
    tokens = _Tokens(standardize(caption).split())
    if tokens.peek() == "there":
        phrases = _parse_there_list(tokens)
        relation = None
    else:
        first = _parse_phrase(tokens)
        if tokens.accept("is"):
            relation_name = _parse_relation(tokens)
            second = _parse_phrase(tokens)
            if first.count != 1 or second.count != 1:
                raise ValueError("a relation is between two single objects")
            phrases = [first, second]
            relation = (0, relation_name, 1)
            if tokens.accept("and"):
                phrases += _parse_there_list(tokens)
        else:
            phrases = _parse_list(tokens, first)
            relation = None
    if tokens.peek() is not None:
        raise ValueError(f"unexpected word {tokens.peek()!r} at position {tokens.pos}")
    return ParsedCaption(tuple(phrases), relation)


def _parse_there_list(tokens: _Tokens) -> list[NounPhrase]:
    if not tokens.accept("there"):
        raise ValueError(f"expected 'there' at position {tokens.pos}")
    verb = tokens.take()
    if verb not in ("is", "are"):
        raise ValueError(f"expected 'is' or 'are' after 'there', got {verb!r}")
    phrases = _parse_list(tokens, _parse_phrase(tokens))
    if (verb == "is") != (phrases[0].count == 1):
        raise ValueError(f"'there {verb}' does not agree with {phrases[0].describe()!r}")
    return phrases


def _parse_list(tokens: _Tokens, first: NounPhrase) -> list[NounPhrase]:
    """NP, NP ... and NP: the separators are commas (gone by now) except the last, which is 'and'."""
    phrases, last_separator = [first], None
    while True:
        if tokens.peek() == "and" and tokens.peek(1) in COUNT_WORDS:
            tokens.take()
            last_separator = "and"
        elif tokens.peek() in COUNT_WORDS:
            last_separator = ","
        else:
            break
        phrases.append(_parse_phrase(tokens))
    if len(phrases) > 1 and last_separator != "and":
        raise ValueError("a list must end with 'and' before its last phrase")
    return phrases


def _parse_phrase(tokens: _Tokens) -> NounPhrase:
    article = tokens.take()
    if article not in COUNT_WORDS:
        raise ValueError(f"expected a count word, got {article!r}")
    count = COUNT_WORDS[article]
    starts_with_vowel = (tokens.peek() or " ")[0] in "aeiou"
    if article in ("a", "an") and (article == "an") != starts_with_vowel:
        raise ValueError(f"wrong article {article!r} before {tokens.peek()!r}")
    size = tokens.take() if tokens.peek() in SIZES else None
    colour = tokens.take()
    if colour not in COLOURS:
        raise ValueError(f"expected a colour, got {colour!r}")
    noun = tokens.take()
    nouns = _SINGULAR if count == 1 else _PLURAL
    if noun not in nouns:
        raise ValueError(f"expected a {'singular' if count == 1 else 'plural'} shape, got {noun!r}")
    return NounPhrase(count, size, colour, nouns[noun])


def _parse_relation(tokens: _Tokens) -> str:
    for words, name in _RELATION_WORDS.items():
        if tokens.accept(*words):
            return name
    raise ValueError(f"expected a relation at position {tokens.pos}")


# --------------------------------------------------------------------------------------- judging


def check_caption(caption: str, scene: Scene) -> Verdict:
    """Judge a caption under the reading that makes the most of its facts true (then leaves the
    fewest objects unnamed); brute force over object-to-phrase assignments, fine for <= 4 objects."""
    try:
        parsed = parse_caption(caption)
    except ValueError as error:
        return Verdict(parsed=False, error=str(error))
    best = None
    choices = [[None, *(i for i, p in enumerate(parsed.phrases) if p.matches(obj))] for obj in scene.objects]
    for assignment in itertools.product(*choices):
        claimed = [[obj for obj, i in zip(scene.objects, assignment) if i == k] for k in range(len(parsed.phrases))]
        if any(len(objs) > phrase.count for objs, phrase in zip(claimed, parsed.phrases)):
            continue
        false_facts = _false_facts(parsed, claimed, scene.frame)
        missing = [obj.describe() for obj, i in zip(scene.objects, assignment) if i is None]
        if best is None or (len(false_facts), len(missing)) < (len(best[0]), len(best[1])):
            best = (false_facts, missing)
    return Verdict(parsed=True, false_facts=best[0], missing=best[1])


def _false_facts(parsed: ParsedCaption, claimed: list[list[ShapeObject]], image_size) -> list[str]:
    facts = []
    for phrase, objs in zip(parsed.phrases, claimed):
        if not objs:
            facts.append(f"no {phrase.describe()}")
        elif len(objs) != phrase.count:
            facts.append(f"count of {phrase.describe(plural_form=True)} is {len(objs)}, not {phrase.count}")
    if parsed.relation is not None:
        i, rel, j = parsed.relation
        # with either side absent the relation cannot be checked; "no ..." already says so
        both_there = claimed[i] and claimed[j]
        if both_there and not relation_holds(claimed[i][0], claimed[j][0], rel, image_size, strict=False):
            facts.append(f"{parsed.phrases[i].describe()} is not {rel} {parsed.phrases[j].describe()}")
    return facts


def grounded_accuracy(captions: list[str], scenes: list[Scene]) -> float:
    """Share of captions that are entirely true and complete for their scene."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    if not captions:
        raise ValueError("no captions to grade")
    return sum(check_caption(c, s).correct for c, s in zip(captions, scenes)) / len(captions)
