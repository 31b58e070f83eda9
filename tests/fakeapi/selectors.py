"""Label and field selectors with the API server's grammar and matching rules.

Label selectors follow k8s.io/apimachinery/pkg/labels: comma-joined requirements `key`, `!key`, `key=v`,
`key==v`, `key!=v`, `key in (a,b)`, `key notin (a,b)`, `key>n`, `key<n`. `!=` and `notin` match objects that
lack the key, as on the real server. Field selectors follow pkg/fields: `field=v`, `field==v`,
`field!=v`, with `\\,` `\\=` `\\\\` escapes; the fields a resource supports are checked by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SPECIAL = ("!=", "==", "=", "!", "(", ")", ",", "<", ">")
_NAME_RULE = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character"
)

_VALUE_RULE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
    "start and end with an alphanumeric character"
)
_INTEGER = "the value must be an integer"


class SelectorError(ValueError):
    """The selector does not parse; the server answers 400 BadRequest with this message."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and value in self.values
        if self.operator in ("!=", "notin"):
            return not present or value not in self.values
        return present and _compare(value, self.operator, int(self.values[0]))


def _compare(value: str | None, operator: str, bound: int) -> bool:
    try:
        number = int(value or "")
    except ValueError:
        return False
    return number > bound if operator == "gt" else number < bound


@dataclass(frozen=True, slots=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    index = 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        special = next((s for s in _SPECIAL if text.startswith(s, index)), None)
        if special is not None:
            tokens.append(special)
            index += len(special)
            continue
        start = index
        while index < len(text) and not text[index].isspace() and not text.startswith(_SPECIAL, index):
            index += 1
        tokens.append(text[start:index])
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _tokens(text)
        self._position = 0

    def _peek(self) -> str | None:
        return self._tokens[self._position] if self._position < len(self._tokens) else None

    def _take(self) -> str | None:
        token = self._peek()
        self._position += 1
        return token

    def parse(self) -> LabelSelector:
        requirements: list[Requirement] = []
        while self._peek() is not None:
            requirements.append(self._requirement())
            separator = self._take()
            if separator is None:
                break
            if separator != ",":
                raise SelectorError(f"found '{separator}', expected: ',' or 'end of string'")
            if self._peek() is None:
                raise SelectorError("found '', expected: !, identifier, or 'end of string'")
        return LabelSelector(tuple(requirements))

    def _requirement(self) -> Requirement:
        negated = self._peek() == "!"
        if negated:
            self._take()
        key = self._identifier()
        _validate_key(key)
        if negated:
            return Requirement(key, "!")
        if self._peek() in (None, ","):
            return Requirement(key, "exists")
        operator = self._take()
        if operator in ("in", "notin"):
            return Requirement(key, operator, self._value_list())
        if operator in ("=", "==", "!="):
            return Requirement(key, "!=" if operator == "!=" else "=", (self._exact_value(),))
        if operator in (">", "<"):
            bound = self._exact_value()
            if not re.fullmatch(r"-?\d+", bound):
                raise SelectorError(
                    f"unable to parse requirement: for 'Gt', 'Lt' operators, {_INTEGER}: {bound}"
                )
            return Requirement(key, "gt" if operator == ">" else "lt", (bound,))
        raise SelectorError(f"found '{operator}', expected: in, notin, =, ==, !=, gt, lt")

    def _identifier(self) -> str:
        token = self._take()
        if token is None or token in _SPECIAL:
            raise SelectorError(f"found '{token or ''}', expected: identifier")
        return token

    def _exact_value(self) -> str:
        if self._peek() in (None, ","):
            return ""
        value = self._identifier()
        _validate_value(value)
        return value

    def _value_list(self) -> tuple[str, ...]:
        if self._take() != "(":
            raise SelectorError("found '', expected: '('")
        values: list[str] = []
        while True:
            token = self._peek()
            if token in (",", ")"):
                values.append("")
            else:
                values.append(self._identifier())
                _validate_value(values[-1])
            closing = self._take()
            if closing == ")":
                break
            if closing != ",":
                raise SelectorError(f"found '{closing or ''}', expected: ',', or ')'")
        return tuple(values)


def _validate_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise SelectorError(
            f'unable to parse requirement: Invalid value: "{key}": prefix part must be a DNS subdomain'
        )
    if len(name) > 63 or not _NAME.match(name):
        raise SelectorError(f'unable to parse requirement: Invalid value: "{key}": {_NAME_RULE}')


def _validate_value(value: str) -> None:
    if value and (len(value) > 63 or not _NAME.match(value)):
        raise SelectorError(f'unable to parse requirement: Invalid value: "{value}": {_VALUE_RULE}')


def parse_label_selector(text: str) -> LabelSelector:
    return _Parser(text).parse()


@dataclass(frozen=True, slots=True)
class FieldTerm:
    field: str
    negated: bool
    value: str

    def matches(self, fields: Mapping[str, str]) -> bool:
        return (fields.get(self.field) == self.value) != self.negated


@dataclass(frozen=True, slots=True)
class FieldSelector:
    terms: tuple[FieldTerm, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.terms

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all(term.matches(fields) for term in self.terms)


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def _field_term(term: str, whole: str) -> FieldTerm:
    escaped = False
    for index, char in enumerate(term):
        if escaped:
            escaped = False
            continue
        if char == "\\":
            escaped = True
            continue
        for operator in ("!=", "==", "="):
            if term.startswith(operator, index):
                field = term[:index].strip()
                value = _unescape(term[index + len(operator) :])
                return FieldTerm(field, operator == "!=", value)
    raise SelectorError(f"invalid selector: '{whole}'; can't understand '{term}'")


def parse_field_selector(text: str, supported: frozenset[str]) -> FieldSelector:
    if not text.strip():
        return FieldSelector()
    terms = tuple(_field_term(term, text) for term in _split_unescaped(text, ","))
    for term in terms:
        if term.field not in supported:
            raise SelectorError(f"field label not supported: {term.field}")
    return FieldSelector(terms)
