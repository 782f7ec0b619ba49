"""Which rules an analyzer applies: :func:`resolve_rules` turns what the user passed
(rule instances, built-in rule ids, or one of either) into checked rule instances.

Example:
    >>> [r.id for r in resolve_rules("dead_relu")]
    ['dead_relu']
"""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch.rules import DEFAULT_RULES, RULE_IDS, Rule


def resolve_rules(rules: Sequence[Rule | str] | Rule | str) -> tuple[Rule, ...]:
    """Rule instances for ``rules``; a string picks the built-in rule with that id.

    Raises:
        ValueError: naming ``rules``, for a wrong type or an id that is not built in.
    """
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    try:
        items = list(rules)
    except TypeError:
        raise ValueError(
            f"rules must be a sequence of Rule instances or rule ids, got {rules!r}"
        ) from None
    by_id = {r.id: r for r in DEFAULT_RULES}
    wrong = [
        r for r in items if not isinstance(r, (str, Rule)) or (isinstance(r, Rule) and not r.id)
    ]
    if wrong:
        raise ValueError(
            f"rules must hold gradwatch Rule instances with an id or rule ids, got {wrong[0]!r}"
        )
    unknown = sorted(r for r in items if isinstance(r, str) and r not in by_id)
    if unknown:
        raise ValueError(f"rules: unknown rule ids {unknown}; known: {list(RULE_IDS)}")
    return tuple(by_id[r] if isinstance(r, str) else r for r in items)


def check_rules_fit(rules: tuple[Rule, ...], window: int) -> None:
    """Every rule's window fits in the analyzer's, and no id appears twice.

    Raises:
        ValueError: naming the window or the duplicate ids.
    """
    for rule in rules:
        if rule.window > window:
            raise ValueError(
                f"window={window} is smaller than {type(rule).__name__}.window={rule.window}"
            )
    ids = [r.id for r in rules]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"rules has duplicate rule ids: {dupes}")


__all__ = ["check_rules_fit", "resolve_rules"]
