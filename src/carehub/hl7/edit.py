"""An exact editor for HL7 v2 text: change a few fields, leave every other byte alone.

The engine forwards the sender's bytes, never a re-serialised parse tree (hl7apy drops Z
segments and reorders nothing it does not understand; see the performance baseline, section 2).
So edits are made on the text itself: only the segment holding the edited field is split and
re-joined, with the message's own delimiters from MSH, and the output differs from the input
only in the edited values, the removed or added segments, and in segment terminators, which
are normalised to CR.

    edit = MessageEditor(text)
    edit.set("PID-3[2].4.1", "RGH")         # pads missing repetitions, components, ...
    edit.copy("PID-3[1].1", "PID-2")
    edit.clear("PID-19")
    edit.remove_segments("ZPI")              # every ZPI; "ZPI[2]" for the second only
    edit.add_segment("ZNT|1|note", after="PV1")
    text = edit.text()

Paths are the lazy view's terse paths (``PID-3[2].4.1``, ``NTE[2]-3``, ``MSH-5``) with MSH
numbered as HL7 does: MSH-1 is the field separator and MSH-2 the encoding characters, and
neither can be edited. As in the view, an explicit ``[1]`` addresses the first repetition
only, while a bare ``PID-3`` is the whole field with every repetition: an editor must tell
"replace the first identifier" from "replace all identifiers".
"""

from __future__ import annotations

import re

from carehub.hl7.view import (
    FieldPath,
    MessageView,
    PathError,
    Separators,
    escape,
    parse_path,
    unescape,
)

__all__ = ["EditError", "MessageEditor", "PathError", "check_path", "check_segment"]

_SEGMENT = re.compile(r"^(?P<name>[A-Z][A-Z0-9]{2})(?:\[(?P<occ>\d+)\])?$")
#: Segments that are not the message's own: the header, and the batch wrappers.
_NOT_ADDABLE = frozenset({"MSH", "FHS", "BHS", "BTS", "FTS"})


class EditError(ValueError):
    """An edit that cannot be made exactly as asked (missing segment, delimiter field, ...)."""


def check_path(path: str, *, writable: bool = False) -> FieldPath:
    """Parse a path and reject what no edit can use, so configuration fails before messages do.

    ``writable`` also rejects whole-segment paths and MSH-1/MSH-2 (the delimiters)."""
    spec = parse_path(path)
    if writable:
        if not spec.field:
            raise PathError(f"path {path!r} names a whole segment; name a field, e.g. {path}-3")
        if spec.segment == "MSH" and spec.field <= 2:
            raise PathError(
                f"path {path!r}: MSH-1 and MSH-2 hold the message's delimiters and cannot be edited"
            )
    return spec


def check_segment(path: str) -> tuple[str, int | None]:
    """A segment path (``ZPI``, or ``ZPI[2]`` for one occurrence) as (name, occurrence or None
    for every one); raises PathError naming the path."""
    match = _SEGMENT.match(path.strip().upper())
    if match is None:
        raise PathError(
            f"bad segment {path!r}: expected a segment name such as ZPI, or ZPI[2] for one "
            "occurrence"
        )
    occurrence = match.group("occ")
    if occurrence is not None and int(occurrence) == 0:
        raise PathError(f"bad segment {path!r}: numbers in a path start at 1")
    return match.group("name"), int(occurrence) if occurrence is not None else None


class MessageEditor:
    """Field-level edits on one message's text; see the module docstring for the guarantees."""

    __slots__ = ("_segments", "_view", "separators")

    def __init__(self, text: str) -> None:
        # The view already knows how to find MSH, read the delimiters and split segments on
        # CR, LF or CRLF; reusing it keeps reads here and in routing conditions identical.
        view = MessageView(text)
        self.separators: Separators = view.separators
        self._segments: list[str] = list(view.segments)
        self._view: MessageView | None = None

    # -- reading ----------------------------------------------------------------------------
    @property
    def segments(self) -> tuple[str, ...]:
        """The current segments, without terminators."""
        return tuple(self._segments)

    def text(self) -> str:
        """The message with every segment ended by CR."""
        return "\r".join(self._segments) + "\r"

    def raw(self, path: str | FieldPath) -> str:
        """The escaped text at a path, '' when absent; a segment path gives the whole segment."""
        spec, explicit = _spec(path)
        position = self._find(spec)
        if position is None:
            return ""
        segment = self._segments[position]
        if not spec.field:
            return segment
        if spec.segment == "MSH" and spec.field <= 2:
            return self.separators.field if spec.field == 1 else self._msh_fields(segment)[1]
        value = segment
        for separator, index in self._chain(spec, explicit):
            parts = value.split(separator)
            if index >= len(parts):
                return ""
            value = parts[index]
        return value

    def get(self, path: str | FieldPath) -> str:
        """The unescaped value at a path; '' when absent."""
        spec, _ = _spec(path)
        value = self.raw(path)
        if spec.segment == "MSH" and spec.field in (1, 2):
            return value
        return unescape(value, self.separators)

    def has_segment(self, path: str | FieldPath) -> bool:
        """Whether the segment (and occurrence) a path names is in the message."""
        spec, _ = _spec(path)
        return self._find(spec) is not None

    def view(self) -> MessageView:
        """A read-only view of the message as edited so far (for conditions on later edits);
        built once per state, not per read."""
        if self._view is None:
            self._view = MessageView(self.text())
        return self._view

    # -- editing ----------------------------------------------------------------------------
    def set(self, path: str | FieldPath, value: str, *, escape: bool = True) -> None:
        """Write ``value`` at ``path``, padding missing fields, repetitions, components and
        subcomponents. With ``escape`` (the default) delimiters in the value are encoded;
        without it the value is written as is, and must not contain a delimiter that would
        move it out of the place the path names."""
        spec, explicit = self._writable(path)
        position = self._find(spec)
        if position is None:
            raise EditError(
                f"cannot set {_name(path)}: the message has no {_segment(spec)} segment"
            )
        chain = self._chain(spec, explicit)
        if escape:
            text = _escape(value, self.separators)
        else:
            self._check_raw(path, value, len(chain))
            text = value
        self._segments[position] = self._put(self._segments[position], chain, text, spec)
        self._view = None

    def clear(self, path: str | FieldPath) -> None:
        """Empty the value at a path. Trailing delimiters the edit leaves behind are dropped;
        a missing segment or field is already clear, so that is not an error."""
        spec, explicit = self._writable(path)
        position = self._find(spec)
        if position is None:
            return
        chain = self._chain(spec, explicit)
        self._segments[position] = self._put(self._segments[position], chain, "", spec)
        self._view = None

    def copy(self, source: str | FieldPath, target: str | FieldPath) -> None:
        """Copy the escaped text from one path to another (an absent source clears the target).

        The text moves as written, so escapes are neither decoded nor doubled."""
        target_spec, _ = self._writable(target)
        if self._find(target_spec) is None:
            raise EditError(
                f"cannot copy to {_name(target)}: the message has no {_segment(target_spec)} "
                "segment"
            )
        value = self.raw(source)
        try:
            self.set(target, value, escape=False)
        except EditError as err:
            raise EditError(f"cannot copy {_name(source)} to {_name(target)}: {err}") from None

    def remove_segments(self, path: str) -> list[str]:
        """Drop every segment of a name (``ZPI``) or one occurrence (``ZPI[2]``) and return
        the segments dropped, in order; none there is not an error (nothing to remove). The
        other segments keep their bytes and their order."""
        name, occurrence = self._segment_path(path)
        if name == "MSH":
            raise EditError("MSH cannot be removed: it is the message header")
        positions = self._positions(name)
        if occurrence is not None:
            positions = positions[occurrence - 1 : occurrence]
        removed = [self._segments[position] for position in positions]
        for position in reversed(positions):
            del self._segments[position]
        if removed:
            self._view = None
        return removed

    def add_segment(self, text: str, *, after: str | None = None, before: str | None = None) -> int:
        """Insert one segment, written with this message's delimiters, and return its position.

        ``after: PV1`` puts it after the last PV1 (``PV1[1]``: after the first), ``before:
        OBX`` before the first OBX (``OBX[2]``: before the second); with neither it goes at the
        end. An anchor segment the message does not have is an error, as an edit of a field in
        a missing segment is."""
        if after is not None and before is not None:
            raise EditError("add takes 'after' or 'before', not both")
        name = self._check_segment_text(text)
        if after is None and before is None:
            position = len(self._segments)
        else:
            anchor = after if after is not None else before
            assert anchor is not None
            anchor_name, occurrence = self._segment_path(anchor)
            positions = self._positions(anchor_name)
            if occurrence is not None:
                positions = positions[occurrence - 1 : occurrence]
            if not positions:
                where = "after" if after is not None else "before"
                raise EditError(
                    f"cannot add {name} {where} {_name(anchor)}: the message has no "
                    f"{_name(anchor).upper()} segment"
                )
            position = positions[-1] + 1 if after is not None else positions[0]
        self._segments.insert(position, text)
        self._view = None
        return position

    # -- internals --------------------------------------------------------------------------
    def _segment_path(self, path: str) -> tuple[str, int | None]:
        try:
            return check_segment(path)
        except PathError as err:
            raise EditError(str(err)) from None

    def _positions(self, name: str) -> list[int]:
        return [position for position, segment in enumerate(self._segments) if segment[:3] == name]

    def _check_segment_text(self, text: str) -> str:
        """The new segment's name, once the text is known to be one segment of this message."""
        name = text[:3]
        if "\r" in text or "\n" in text:
            raise EditError(f"a segment to add is one line; {text!r} has a line break")
        separator = text[3:4]
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name) or separator not in (
            "",
            self.separators.field,
        ):
            raise EditError(
                f"segment {text!r} must start with a segment name and this message's field "
                f"separator {self.separators.field!r}, e.g. ZNT{self.separators.field}1"
            )
        if name in _NOT_ADDABLE:
            raise EditError(
                f"{name} cannot be added: a message has one header and no batch segments"
            )
        return name

    def _writable(self, path: str | FieldPath) -> tuple[FieldPath, bool]:
        if isinstance(path, str):
            try:
                check_path(path, writable=True)
            except PathError as err:
                raise EditError(str(err)) from None
        spec, explicit = _spec(path)
        if not spec.field or (spec.segment == "MSH" and spec.field <= 2):
            raise EditError(f"path {_name(path)} cannot be edited")
        return spec, explicit

    def _find(self, spec: FieldPath) -> int | None:
        seen = 0
        for position, segment in enumerate(self._segments):
            if segment[:3] == spec.segment:
                seen += 1
                if seen == spec.occurrence:
                    return position
        return None

    def _msh_fields(self, segment: str) -> list[str]:
        return segment.split(self.separators.field)

    def _chain(self, spec: FieldPath, explicit: bool) -> list[tuple[str, int]]:
        """(separator, 0-based index) per level from the segment down to the addressed value."""
        seps = self.separators
        # MSH-1 is the separator itself, so MSH-n is the (n-1)th piece after splitting.
        field_index = spec.field - 1 if spec.segment == "MSH" else spec.field
        chain = [(seps.field, field_index)]
        if explicit or spec.component:
            chain.append((seps.repetition, (spec.repetition or 1) - 1))
        if spec.component:
            chain.append((seps.component, spec.component - 1))
            if spec.subcomponent:
                chain.append((seps.subcomponent, spec.subcomponent - 1))
        return chain

    def _put(self, segment: str, chain: list[tuple[str, int]], value: str, spec: FieldPath) -> str:
        keep = 2 if spec.segment == "MSH" else 1  # the segment name, and MSH-2
        return _put(segment, chain, value, keep)

    def _check_raw(self, path: str | FieldPath, value: str, depth: int) -> None:
        seps = self.separators
        forbidden = [seps.field, "\r", "\n", seps.repetition, seps.component, seps.subcomponent]
        # depth 1: a whole field may hold repetitions, components and subcomponents; each
        # level further down loses one more delimiter.
        allowed = {1: 3, 2: 2, 3: 1, 4: 0}[depth]
        bad = [c for c in forbidden[: len(forbidden) - allowed] if c in value]
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            raise EditError(
                f"raw value {value!r} for {_name(path)} contains delimiter {shown}, which would "
                "move it out of that place; escape it or address a larger part"
            )


def _put(text: str, chain: list[tuple[str, int]], value: str, keep: int = 0) -> str:
    """Replace the piece ``chain`` names inside ``text``; ``keep`` is the minimum piece count."""
    separator, index = chain[0]
    parts = text.split(separator)
    if len(chain) == 1:
        new = value
    else:
        current = parts[index] if index < len(parts) else ""
        new = _put(current, chain[1:], value)
    if index < len(parts):
        was_last = index == len(parts) - 1
        parts[index] = new
        if new == "" and was_last:
            # Only a trailing piece the edit emptied is trimmed (with the empties before it,
            # which only existed to position it); delimiters after the edited place stay.
            while len(parts) > max(keep, 1) and parts[-1] == "":
                parts.pop()
            if parts == [""]:
                return ""
    else:
        if new == "":
            return text  # nothing to write: do not pad for an empty value
        parts.extend([""] * (index - len(parts)))
        parts.append(new)
    return separator.join(parts)


def _spec(path: str | FieldPath) -> tuple[FieldPath, bool]:
    spec = path if isinstance(path, FieldPath) else check_path(path)
    return spec, spec.repetition != 0  # 0: no [n] written, the whole field


def _escape(value: str, seps: Separators) -> str:
    return escape(value, seps) if value else value


def _name(path: str | FieldPath) -> str:
    return path.strip() if isinstance(path, str) else str(path)


def _segment(spec: FieldPath) -> str:
    return spec.segment + (f"[{spec.occurrence}]" if spec.occurrence != 1 else "")
