"""A safe evaluator for SVAMP equations: numbers, + - * /, parentheses and unary minus; nothing else.

Model output and data are parsed with ``ast`` in ``eval`` *mode* (a parse, never an execution) and walked by
hand; any other node (names, calls, attributes, powers, subscripts, comprehensions ...) is rejected.
"""

from __future__ import annotations

import ast
import math

MAX_LENGTH = 512  # longer strings are not SVAMP equations (and would only cost parse time)
MAX_MAGNITUDE = 1e15


class UnsafeExpression(ValueError):
    """The string is not an arithmetic expression this evaluator accepts."""


def evaluate(expression: str) -> float:
    """Value of ``expression``; raises UnsafeExpression (or ZeroDivisionError) instead of ever executing it."""
    if not isinstance(expression, str) or len(expression) > MAX_LENGTH:
        raise UnsafeExpression("not a string of reasonable length")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as e:
        raise UnsafeExpression(f"does not parse: {e}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        try:
            v = float(node.value)  # type: ignore[arg-type]  # an int or float (checked above); one of 309+ digits overflows here
        except OverflowError:
            raise UnsafeExpression("number out of range") from None
        if not math.isfinite(v) or abs(v) > MAX_MAGNITUDE:  # 1e309 parses as inf
            raise UnsafeExpression("number out of range")
        return v
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Add):
            v = a + b
        elif isinstance(node.op, ast.Sub):
            v = a - b
        elif isinstance(node.op, ast.Mult):
            v = a * b
        else:
            if b == 0:
                raise ZeroDivisionError("division by zero")
            v = a / b
        if not math.isfinite(v) or abs(v) > MAX_MAGNITUDE:
            raise UnsafeExpression("value out of range")
        return v
    raise UnsafeExpression(f"{type(node).__name__} is not allowed")


def try_evaluate(expression: str) -> float | None:
    """Value, or None for anything that is not a valid, finite arithmetic expression."""
    try:
        return evaluate(expression)
    except (UnsafeExpression, ZeroDivisionError, OverflowError, RecursionError, MemoryError):
        return None


def equations_equal(prediction: str, target: str, tol: float = 1e-4) -> bool:
    """SVAMP scoring: two equations are equal when both evaluate and their values agree."""
    p, t = try_evaluate(prediction), try_evaluate(target)
    return p is not None and t is not None and abs(p - t) <= tol * max(1.0, abs(t))
