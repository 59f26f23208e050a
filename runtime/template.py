"""Chat templates in a Jinja sandbox with resource limits.

A chat template ships in the checkpoint's tokenizer_config.json: untrusted code. Jinja's sandbox keeps it
from Python internals, not from running forever or building huge values (`{{ 9 ** 9 ** 9 }}`, nested
`range(99999)` loops, `'A' * 10**10`, recursive macros). The limits are enforced cooperatively inside
the render, not by a watchdog: a Python thread cannot be stopped, so a render in a worker thread that
misses its deadline would keep spinning and holding memory for good (one more per hostile request), and
a subprocess per render (re-importing `__main__`, pickling each dialog) is fragile and slow next to a
render of milliseconds. So every loop step, call, filter, operator, subscript, comparison and piece of
output passes a guard that checks the render's budget (deadline, loop steps, call depth, characters
emitted); each value the template builds is measured where it is built; builtins that could build a
huge value in one C call are checked before they run (`*`, `**`, `%`, `~`, str.format, replace, join,
indent and padding widths) or are not offered (lipsum, pprint, urlize, wordwrap, striptags,
str.expandtabs/translate/encode, int.to_bytes). Compiling evaluates nothing: operators are intercepted
and every filter takes the render context, which turns off Jinja's constant folding.
"""
from __future__ import annotations

import json
import types
from datetime import datetime
from typing import Any, Callable

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, pass_context
from jinja2.visitor import NodeTransformer

from llama3_deploy.errors import DeployError

from .template_budget import (MAX_CALL_DEPTH, MAX_JSON_INDENT, MAX_RANGE, _BUDGET, _Budget, _CONCAT, _COUNT,
                              _DROPPED_FILTERS, _EMIT, _NUMBER_ATTRS, _PRECHECKS, _RenderLimit, _STEPS,
                              _STR_METHODS, _VALUE, _budget, _check_format, _check_join, _check_power,
                              _check_repeat, _check_replace, _check_width, _guard_filter)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' tojson: unlike Jinja's built-in it does not HTML-escape. Encoded piece by piece,
    # so a wide or deeply indented value is refused as it grows rather than after it was built.
    width = len(indent) if isinstance(indent, str) else indent
    if isinstance(width, int) and width > MAX_JSON_INDENT:
        raise _RenderLimit(f"tojson indent is limited to {MAX_JSON_INDENT}")
    budget, out, size = _budget(), [], 0
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    for chunk in encoder.iterencode(x):
        size += len(chunk)
        budget.check_size(size, "tojson")
        out.append(chunk)
    return "".join(out)


class _Namespace(Namespace):
    """`namespace()`, printed without its contents. It is the one mutable object a template can build:
    lists holding it are measured when built, so its printed size must not grow afterwards."""

    def __repr__(self) -> str:
        return "<Namespace>"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _RenderLimit(f"range() is limited to {MAX_RANGE} items")
    return r


def _concat(context: Any, _: Any, *parts: Any) -> str:
    """`a ~ b ~ ...`, refused before joining when the parts together are too big."""
    budget = _budget()
    budget.check_size(sum(len(p) if isinstance(p, str) else len(str(p)) for p in parts), "'~'")
    return (markup_join if context.eval_ctx.autoescape else str_join)(parts)


_INTERNAL_FILTERS = {
    _STEPS: lambda context, iterable: _budget().iterate(iterable),
    _VALUE: lambda context, value: _budget().bounded(value, "an expression"),
    # output is counted, then converted (or escaped) by Jinja exactly as before
    _EMIT: lambda context, value: _budget().emit(len(value) if isinstance(value, str) else len(str(value)), value),
    _COUNT: lambda context, chars: _budget().emit(chars),  # a node's literal text, counted once per run
    _CONCAT: _concat,
}


class _GenerationTag(Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` (assistant masks) and render its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

    def _passthrough(self, caller: Any) -> str:
        return caller()


# ---- the environment --------------------------------------------------------------------------

def _wrap(node: nodes.Expr, name: str, args: list[nodes.Expr] | None = None) -> nodes.Filter:
    return nodes.Filter(node, name, args or [], [], None, None, lineno=node.lineno)


class _Guards(NodeTransformer):
    """Route loops, built values and output of the parsed template through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = _wrap(node.iter, _STEPS)
        return node

    def _built(self, node: nodes.Expr) -> nodes.Expr:
        node = self.generic_visit(node)
        return node if getattr(node, "ctx", "load") != "load" else _wrap(node, _VALUE)

    visit_List = visit_Tuple = visit_Dict = visit_Compare = _built

    def visit_Concat(self, node: nodes.Concat) -> nodes.Expr:
        node = self.generic_visit(node)
        return _wrap(nodes.Const("", lineno=node.lineno), _CONCAT, node.nodes)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        literal = sum(len(c.data) for c in node.nodes if isinstance(c, nodes.TemplateData))
        node.nodes = [c if isinstance(c, nodes.TemplateData) else _wrap(c, _EMIT) for c in node.nodes]
        if literal:
            node.nodes.insert(0, _wrap(nodes.Const(literal, lineno=node.lineno), _COUNT))
        return node


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "**":
            _check_power(left, right)
        elif operator == "*":
            _check_repeat(budget, left, right)
        elif operator == "%" and isinstance(left, str):
            _check_format(budget, left, right, braces=False)
        return budget.bounded(super().call_binop(context, operator, left, right), f"'{operator}'")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # Jinja's argument names
        budget = _budget()
        budget.tick()
        if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive for loop
            args = (budget.iterate(args[0]), *args[1:])
        elif isinstance(__obj, types.BuiltinMethodType) and isinstance(__obj.__self__, str):  # str methods that grow
            s, method = __obj.__self__, __obj.__name__
            if method in ("center", "ljust", "rjust", "zfill") and args:
                _check_width(budget, s, args[0], f"str.{method}")
            elif method == "replace":
                _check_replace(budget, s, *args, **kwargs)
            elif method == "join" and args:  # materialized: the check sees what join() gets
                args = (_check_join(budget, list(args[0]), s), *args[1:])
        if budget.depth >= MAX_CALL_DEPTH:
            raise _RenderLimit(f"its calls nest deeper than {MAX_CALL_DEPTH}")
        budget.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        name = getattr(__obj, "name", None) or getattr(__obj, "__name__", type(__obj).__name__)
        return budget.bounded(result, f"a call to {name}")

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().tick()
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().tick()
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str):
            return attr in _STR_METHODS
        if isinstance(obj, (int, float)):
            return attr in _NUMBER_ATTRS
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        source, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(_budget(), source, args[0] if is_map and args else (*args, *kwargs.values()), braces=True)
            return fmt(*args, **kwargs)

        checked.__name__ = value.__name__
        return checked


def _environment() -> _LimitedEnvironment:
    env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    filters = {name: _guard_filter(name, f, _PRECHECKS.get(name))
               for name, f in env.filters.items() if name not in _DROPPED_FILTERS}
    filters["tojson"] = _guard_filter("tojson", _tojson)
    filters.update({name: pass_context(f) for name, f in _INTERNAL_FILTERS.items()})
    env.filters = filters
    env.globals.pop("lipsum", None)
    env.globals.update(range=_range, namespace=_Namespace, raise_exception=_raise_exception,
                       strftime_now=_strftime_now)
    return env


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template (transformers' sandboxed dialect) with every render limit in place.

    Compiling runs no template code, so a hostile template cannot hang or exhaust memory here.
    """
    if not isinstance(source, str):
        raise DeployError(f"chat template must be a string, not {type(source).__name__}")
    env = _environment()
    try:
        tree = env.parse(source)
        for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
            raise DeployError(f"chat template line {node.lineno}: extends/include/import are not supported "
                              "(a chat template must be self-contained)")
        tree = _Guards().visit(tree)
        tree.set_environment(env)
        return env.from_string(tree)
    except jinja2.TemplateSyntaxError as e:
        raise DeployError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from e
    except (RecursionError, MemoryError):
        raise DeployError("chat template is nested too deeply to compile") from None
    except DeployError:
        raise
    except Exception as e:  # e.g. Python's limit on statically nested blocks in the generated code
        raise DeployError(f"chat template cannot be compiled: {type(e).__name__}: {_short(e)}") from e


def render_chat_template(template: jinja2.Template, **variables: Any) -> str:
    """Render under this module's limits; every failure is one DeployError naming the chat template."""
    token = _BUDGET.set(_Budget(tuple(variables.values())))
    try:
        return template.render(**variables)
    except _RenderLimit as e:
        raise DeployError(f"chat template exceeded a render limit: {e}") from None
    except RecursionError:
        raise DeployError("chat template recursed too deeply") from None
    except MemoryError:
        raise DeployError("chat template ran out of memory") from None
    except jinja2.TemplateError as e:
        raise DeployError(f"chat template rejected the messages: {_short(e)}") from e
    except Exception as e:  # the template is untrusted code: any other failure is its own as well
        raise DeployError(f"chat template failed: {type(e).__name__}: {_short(e)}") from e
    finally:
        _BUDGET.reset(token)


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
