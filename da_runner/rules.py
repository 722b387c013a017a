"""The rules a config value can be held to: a type, with its range or choices (da_runner/schema.py
declares one per key). Each rule says in words what it allows (`text`, used by the error messages, by
`da-run --help` and by docs), checks a value (`allows`), and offers a value of the wrong type and one
out of its range (`wrong_type`, `out_of_range`), so that a test can try both on every key."""

import numbers
import re

from omegaconf import DictConfig, ListConfig

NO_RANGE = object()  # out_of_range() of a rule that takes every value of its type


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Rule:
    text = ""

    def allows(self, value) -> bool:
        raise NotImplementedError

    def wrong_type(self):
        return "abc"

    def out_of_range(self):
        return NO_RANGE


class Boolean(Rule):
    text = "true or false"

    def allows(self, value) -> bool:
        return isinstance(value, bool)


class Text(Rule):
    text = "a string"

    def allows(self, value) -> bool:
        return isinstance(value, str)

    def wrong_type(self):
        return 1.5


class Choice(Rule):
    def __init__(self, *options: str, text: str | None = None):
        self.options = options
        self.text = text or ("one of " if len(options) > 1 else "") + ", ".join(map(str, options))

    def allows(self, value) -> bool:
        return isinstance(value, str) and value in self.options

    def wrong_type(self):
        return 1.5

    def out_of_range(self):
        return "nope"


class Matches(Rule):
    """A string matching a regular expression (whole), described by `text`."""

    def __init__(self, pattern: str, text: str):
        self.pattern, self.text = re.compile(pattern), text

    def allows(self, value) -> bool:
        return isinstance(value, str) and self.pattern.fullmatch(value) is not None

    def wrong_type(self):
        return 1.5

    def out_of_range(self):
        return "nope"


class Values(Rule):
    """One of a few numbers, e.g. 1 or 3 channels."""

    def __init__(self, *values: int):
        self.values = values
        self.text = " or ".join(map(str, values))

    def allows(self, value) -> bool:
        return is_number(value) and value in self.values

    def out_of_range(self):
        return max(self.values) + 1


def _bounds_text(ge, gt, le, lt) -> str:
    low = f">= {ge}" if ge is not None else f"> {gt}" if gt is not None else None
    high = f"<= {le}" if le is not None else f"< {lt}" if lt is not None else None
    if low and high:
        left = "[" if ge is not None else "("
        right = "]" if le is not None else ")"
        return f" in {left}{ge if ge is not None else gt}, {le if le is not None else lt}{right}"
    return f" {low or high}" if (low or high) else ""


class Number(Rule):
    """A real number (integers included), optionally bounded: ge/gt below, le/lt above."""
    kind = "a number"

    def __init__(self, ge=None, gt=None, le=None, lt=None, text: str | None = None):
        self.ge, self.gt, self.le, self.lt = ge, gt, le, lt
        positive = self.kind == "an integer" and ge == 1 and le is None and lt is None
        self.text = text or ("a positive integer" if positive else self.kind + _bounds_text(ge, gt, le, lt))

    def _is_type(self, value) -> bool:
        return is_number(value)

    def allows(self, value) -> bool:
        return (self._is_type(value)
                and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def out_of_range(self):
        if self.ge is not None:
            return self.ge - 1
        if self.gt is not None:
            return self.gt - 1 if self.kind == "an integer" else self.gt
        if self.le is not None:
            return self.le + 1
        if self.lt is not None:
            return self.lt
        return NO_RANGE


class Integer(Number):
    kind = "an integer"

    def _is_type(self, value) -> bool:
        return is_int(value)

    def wrong_type(self):
        return 2.5


class Nullable(Rule):
    """null (with what it means) or a value the inner rule allows."""

    def __init__(self, rule: Rule, meaning: str = ""):
        self.rule = rule
        self.text = f"null{f' ({meaning})' if meaning else ''} or {rule.text}"

    def allows(self, value) -> bool:
        return value is None or self.rule.allows(value)

    def wrong_type(self):
        return self.rule.wrong_type()

    def out_of_range(self):
        return self.rule.out_of_range()


class ListOf(Rule):
    """A list whose items follow `item`; `length` fixes its length, `min_length` bounds it."""

    def __init__(self, item: Rule, length: int | None = None, min_length: int = 0, noun: str | None = None):
        self.item, self.length, self.min_length = item, length, min_length
        size = f"{length} " if length is not None else "non-empty " if min_length else ""
        self.text = f"a {size}list of {noun or item.text}"

    def allows(self, value) -> bool:
        return (isinstance(value, (list, tuple, ListConfig)) and len(value) >= self.min_length
                and (self.length is None or len(value) == self.length) and all(self.item.allows(v) for v in value))

    def wrong_type(self):
        return 1.5

    def out_of_range(self):
        bad = self.item.out_of_range()
        if bad is NO_RANGE:
            return [] if self.min_length or self.length else NO_RANGE
        return [bad] * (self.length or max(self.min_length, 1))


class MapOf(Rule):
    """A mapping from the keys in `keys` (any key when None) to values that follow `value`."""

    def __init__(self, value: Rule, keys: tuple[str, ...] | None = None, non_empty: bool = False):
        self.value, self.keys, self.non_empty = value, keys, non_empty
        names = ", ".join(keys) if keys else "name"
        self.text = f"a {'non-empty ' if non_empty else ''}mapping {{{names}: {value.text}}}"

    def allows(self, value) -> bool:
        return (isinstance(value, (dict, DictConfig)) and (len(value) > 0 or not self.non_empty)
                and all((self.keys is None or k in self.keys) and self.value.allows(v) for k, v in value.items()))

    def wrong_type(self):
        return 1.5

    def out_of_range(self):
        bad = self.value.out_of_range()
        return NO_RANGE if bad is NO_RANGE else {(self.keys or ("name",))[0]: bad}


class AnyOf(Rule):
    """A value that one of `rules` allows."""

    def __init__(self, *rules: Rule):
        self.rules = rules
        self.text = " or ".join(rule.text for rule in rules)

    def allows(self, value) -> bool:
        return any(rule.allows(value) for rule in self.rules)

    def wrong_type(self):
        return next(v for v in (1.5, "abc", [1.5]) if not self.allows(v))

    def out_of_range(self):
        for rule in self.rules:
            bad = rule.out_of_range()
            if bad is not NO_RANGE and not self.allows(bad):
                return bad
        return NO_RANGE
