"""The budget a chat template renders within, and the checks on values it builds (runtime/template.py uses them).

Each check runs before a builtin could build a huge value in one C call; the budget counts loop steps, call
depth and characters emitted, and holds the deadline. See runtime/template.py for why limits are cooperative.
"""
from __future__ import annotations

import re
import string
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Callable

import jinja2
from jinja2.runtime import LoopContext

from jinja2.utils import pass_context, pass_environment, pass_eval_context

# ---- limits, per render (a real chat prompt renders in milliseconds, far below all of them) ----
RENDER_TIMEOUT_S = 2.0          # wall clock
MAX_LOOP_STEPS = 250_000        # for-loop iterations, all loops together
MAX_CALL_DEPTH = 64             # nested macro / function calls (recursion)
MAX_RANGE = 100_000             # items of one range() (the Jinja sandbox's own default)
MAX_INT_BITS = 4096             # integers the template computes (about 1200 digits)
MAX_VALUE_CHARS = 1 << 20       # size of any one value built (str characters; containers: items + contents)
MAX_OUTPUT_CHARS = 1 << 22      # characters emitted in all, macro and {% set %} buffers included
# Both size limits grow with the input (by 2x and 4x its characters): long dialogs still render, and a
# template can never do more than a constant factor over printing what it was given.
MAX_JSON_INDENT = 64            # tojson(indent=...)

_BUDGET: ContextVar["_Budget | None"] = ContextVar("chat_template_budget", default=None)
_CONTAINERS = (list, tuple, dict, set, frozenset)  # the sandbox makes them immutable
_STR_METHODS = frozenset(
    "capitalize casefold center count endswith find format format_map index isalnum isalpha isascii isdecimal "
    "isdigit isidentifier islower isnumeric isprintable isspace istitle isupper join ljust lower lstrip partition "
    "removeprefix removesuffix replace rfind rindex rjust rpartition rsplit rstrip split splitlines startswith "
    "strip swapcase title upper zfill".split())
_NUMBER_ATTRS = frozenset("real imag numerator denominator conjugate bit_length is_integer".split())
# Slow or amplifying inside one C call (quadratic regexes, textwrap, nested repr); chat templates do not use them.
_DROPPED_FILTERS = frozenset({"pprint", "urlize", "wordwrap", "striptags"})
# Internal filter names: not valid identifiers, so a template cannot call them.
_STEPS, _VALUE, _EMIT, _COUNT, _CONCAT = "limits:steps", "limits:value", "limits:emit", "limits:count", "limits:concat"


class _RenderLimit(Exception):
    """A render limit was hit (a plain Exception, so no `except TypeError/ValueError` in Jinja swallows it)."""


class _Budget:
    """What one render may still spend."""

    def __init__(self, inputs: Any) -> None:
        self.deadline = time.monotonic() + RENDER_TIMEOUT_S
        self.steps = self.depth = self.emitted = 0
        self._weights: dict[int, tuple[Any, int]] = {}  # id -> (container, weight): chains of `+` stay O(1)
        chars = self.weight(inputs, float("inf"))
        self.max_value, self.max_output = MAX_VALUE_CHARS + 2 * chars, MAX_OUTPUT_CHARS + 4 * chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _RenderLimit(f"it ran longer than {RENDER_TIMEOUT_S:g} s")

    def iterate(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            self.steps += 1
            if self.steps > MAX_LOOP_STEPS:
                raise _RenderLimit(f"its loops ran more than {MAX_LOOP_STEPS} steps")
            self.tick()
            yield item

    def emit(self, chars: int, result: Any = "") -> Any:
        self.emitted += chars
        if self.emitted > self.max_output:
            raise _RenderLimit(f"it produced more than {self.max_output} characters")
        self.tick()
        return result

    def check_size(self, size: float, what: str) -> None:
        if size > self.max_value:
            raise _RenderLimit(f"{what} would build a value of more than {self.max_value} characters")

    def weight(self, value: Any, limit: float | None = None) -> int:
        """Printed-size estimate: string characters, one per scalar and container item, recursively
        (shared items count each time, as printing repeats them); stops counting past `limit`."""
        if isinstance(value, str):
            return len(value)
        limit = self.max_value if limit is None else limit
        total, stack, visited = 0, [value], 0
        while stack and total <= limit:
            v = stack.pop()
            if isinstance(v, str):
                total += len(v)
                continue
            known = self._weights.get(id(v))
            if known is not None and known[0] is v:
                total += known[1]
            elif isinstance(v, _CONTAINERS):
                total += len(v)
                if total <= limit:
                    stack.extend(v)
                    if isinstance(v, dict):
                        stack.extend(v.values())
            else:
                total += 1 + v.bit_length() // 4 if isinstance(v, int) else 1
            visited += 1
            if not visited & 4095:
                self.tick()
        if total <= limit and isinstance(value, _CONTAINERS):
            self._weights[id(value)] = (value, total)  # (immutable: the weight stays true)
        return total

    def bounded(self, value: Any, what: str) -> Any:
        """`value`, once it is known to be within the limits (iterators are checked as consumed)."""
        if isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise _RenderLimit(f"{what} built an integer of more than {MAX_INT_BITS} bits")
        elif isinstance(value, (str, *_CONTAINERS)):
            if self.weight(value) > self.max_value:
                raise _RenderLimit(f"{what} built a value of more than {self.max_value} characters")
        elif isinstance(value, Iterator) and not isinstance(value, LoopContext):
            return self._bounded_iter(value, what)
        return value

    def _bounded_iter(self, it: Iterator[Any], what: str) -> Iterator[Any]:
        total = 0
        for item in it:
            self.tick()
            total += self.weight(item)
            if total > self.max_value:
                raise _RenderLimit(f"{what} produced more than {self.max_value} characters")
            yield item


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # render_chat_template always sets one
        raise jinja2.exceptions.SecurityError("chat templates render only through render_chat_template")
    return budget


# ---- checks before operations that could build a huge value in one step -------------------------

def _check_power(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
            and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
        raise _RenderLimit(f"'**' would build an integer of more than {MAX_INT_BITS} bits")


def _check_repeat(budget: _Budget, left: Any, right: Any) -> None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
            return budget.check_size(max(n, 0) * budget.weight(seq), "'*'")
    if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise _RenderLimit(f"'*' would build an integer of more than {MAX_INT_BITS} bits")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d*))?")


def _check_format(budget: _Budget, fmt: str, args: Any, *, braces: bool) -> None:
    """A format's output is at most its text, its widths/precisions, and each field printing all the arguments."""
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    if braces:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
        fields, star = fmt.count("{"), any("{" in s for s in specs)
    else:
        specs = _PERCENT_SPEC.findall(fmt)
        fields, star = len(specs), any("*" in s for s in specs)
    size = len(fmt) + sum(int(d) if len(d) < 12 else 10**12 for s in specs for d in re.findall(r"\d+", s))
    size += sum(abs(v) for v in values if isinstance(v, int)) if star else 0  # widths taken from the arguments
    budget.check_size(size + fields * (1 + budget.weight(args)), "string formatting")


def _check_replace(budget: _Budget, s: Any, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        n = s.count(old) if not isinstance(count, int) or count < 0 else min(s.count(old), count)
        budget.check_size(len(s) + n * (len(new) - len(old)), "replace")


def _check_join(budget: _Budget, items: list[Any], sep: Any) -> list[Any]:
    total = len(str(sep)) * max(len(items) - 1, 0)
    for item in items:
        total += budget.weight(item)
        budget.check_size(total, "join")
    return items


def _check_width(budget: _Budget, value: Any, width: Any, what: str, per_line: bool = False) -> None:
    width = len(width) if isinstance(width, str) else width  # indent(width='  ') is a prefix string
    if isinstance(width, int):
        budget.check_size((str(value).count("\n") + 1 if per_line else 1) * width, what)


# ---- filters and globals ----------------------------------------------------------------------

_PASS_CONTEXT, _PASS_EVAL, _PASS_ENV = (getattr(dec(lambda: None), "jinja_pass_arg")
                                        for dec in (pass_context, pass_eval_context, pass_environment))


def _guard_filter(name: str, func: Callable[..., Any],
                  precheck: Callable[..., Any] | None = None) -> Callable[..., Any]:
    pass_arg = getattr(func, "jinja_pass_arg", None)

    @pass_context  # needs the render context, so Jinja never runs it at compile time
    def guarded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        if precheck is not None:
            value = precheck(budget, value, *args, **kwargs)
        first = {_PASS_CONTEXT: (context,), _PASS_EVAL: (context.eval_ctx,), _PASS_ENV: (context.environment,)}
        return budget.bounded(func(*first.get(pass_arg, ()), value, *args, **kwargs), f"the {name!r} filter")

    return guarded


def _pre_width(name: str, keyword: str, default: Any, per_line: bool = False) -> Callable[..., Any]:
    def check(budget: _Budget, value: Any, *args: Any, **kwargs: Any) -> Any:
        width = args[0] if args else kwargs.get(keyword, default)
        _check_width(budget, value, width, f"{name}({keyword}={width!r:.20})", per_line)
        return value
    return check


_PRECHECKS: dict[str, Callable[..., Any]] = {
    "center": _pre_width("center", "width", 80), "indent": _pre_width("indent", "width", 4, per_line=True),
    "batch": _pre_width("batch", "linecount", 1), "slice": _pre_width("slice", "slices", 1),
    "join": lambda budget, value, d="", *args, **kwargs: _check_join(budget, list(value), d),
    "replace": lambda budget, s, old, new, count=None: (
        _check_replace(budget, str(s), old, new, -1 if count is None else count), s)[1],
    "format": lambda budget, value, *args, **kwargs: (
        _check_format(budget, str(value), kwargs or args, braces=False), value)[1],
    # sum() of lists is quadratic: feed it through the loop guard so the deadline can stop it between items
    "sum": lambda budget, value, *args, **kwargs: budget.iterate(value),
}
